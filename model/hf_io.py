"""GPT-2 weights in the Hugging Face layout: import into a forge checkpoint, export back out.

The layout is what openai-community/gpt2 (and -medium, -large, -xl) publish: config.json
(GPT2Config) and model.safetensors. Our module names are HF's, with two differences:
- HF's Conv1D stores weights as (in, out), nn.Linear as (out, in): c_attn, c_proj and c_fc
  weights are transposed both ways;
- the published files name tensors without the `transformer.` prefix (h.0.attn.c_attn.weight,
  wte.weight, ...), have no lm_head.weight (tied to wte) and may carry the attention mask
  buffers (h.N.attn.bias / masked_bias); a file saved by GPT2LMHeadModel.save_pretrained has
  the prefix. Import reads both; export writes the published form, which
  GPT2LMHeadModel.from_pretrained loads.

A model of the modern recipe has no transformers twin (ReLU², logit soft-cap, a normed
embedding): export_forge writes any forge model as safetensors under forge's own tensor names
with forge's config beside it, and load_forge_export reads that folder back.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import torch

from model.checkpoint import PRETRAIN_FORMAT, CheckpointManager
from model.gpt import GPT, GPTConfig
from pipeline.encoding import EOT_ID
from pipeline.files import PRETRAIN, WorkFolder, atomic_write, atomic_write_json, sha256_file

CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
IGNORED = re.compile(r"\.attn\.(bias|masked_bias)$")  # causal-mask buffers of old checkpoints
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, and GPT-2's


class HFFormatError(ValueError):
    """A Hugging Face model folder forge cannot read; the message says what is wrong."""


def gpt_config_from_hf(hf: dict) -> GPTConfig:
    """Our GPTConfig for a GPT2Config dict; refuses variants our model does not implement."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFFormatError(f"model_type {hf.get('model_type')!r} is not gpt2")
    n_embd = hf.get("n_embd", 768)
    unsupported = {
        "activation_function": (hf.get("activation_function", "gelu_new"), "gelu_new"),
        "n_inner": (hf.get("n_inner") or 4 * n_embd, 4 * n_embd),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", LAYER_NORM_EPS), LAYER_NORM_EPS),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (
            hf.get("scale_attn_by_inverse_layer_idx", False),
            False,
        ),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), True),
    }
    bad = [
        f"{k}={got!r} (forge implements {want!r})"
        for k, (got, want) in unsupported.items()
        if got != want
    ]
    if bad:
        raise HFFormatError("unsupported GPT-2 variant: " + ", ".join(bad))
    return GPTConfig(
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        dropout=0.0,
        bias=True,
    )


def hf_config(config: GPTConfig) -> dict:
    """The config.json of GPT2LMHeadModel for our config (dropouts 0, as fine for inference)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": min(EOT_ID, config.vocab_size - 1),
        "eos_token_id": min(EOT_ID, config.vocab_size - 1),
        "torch_dtype": "float32",
    }


def load_hf_gpt2(folder: str | Path) -> GPT:
    """A GPT holding the weights of a Hugging Face GPT-2 folder (config.json, model.safetensors)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise HFFormatError(
                f"{path} is missing: a Hugging Face GPT-2 folder holds config.json and "
                "model.safetensors (pytorch_model.bin is not read: it needs unpickling)"
            )
    config = gpt_config_from_hf(json.loads(config_path.read_text()))
    tensors = load_file(weights_path)
    state = {}
    for name, tensor in tensors.items():
        if IGNORED.search(name):
            continue
        key = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if CONV1D.search(key):
            tensor = tensor.t()
        state[key] = tensor.float().contiguous()
    head = state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state.get("transformer.wte.weight", head)):
        raise HFFormatError(f"{weights_path}: lm_head.weight differs from wte.weight (untied)")
    model = GPT(config)
    expected = {k for k in model.state_dict() if k != "lm_head.weight"}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise HFFormatError(
            f"{weights_path} does not match a {config.n_layer}-layer GPT-2: missing "
            f"{missing[:4]}, unexpected {extra[:4]}"
        )
    for key, tensor in state.items():
        want = model.state_dict()[key].shape
        if tensor.shape != want:
            raise HFFormatError(
                f"{weights_path}: {key} has shape {tuple(tensor.shape)}, "
                f"config.json implies {tuple(want)}"
            )
    model.load_state_dict(state, strict=False)  # lm_head.weight is wte.weight
    return model.eval()


def import_gpt2(folder: str | Path, out: str | Path) -> Path:
    """Write a Hugging Face GPT-2 folder as a forge checkpoint; returns its path.

    out ending in .pt is the checkpoint file; anything else is a work folder, and the
    checkpoint goes to out/pretrain/checkpoints/ckpt-000000.pt, so every CHECKPOINT argument
    and `finetune.base` can name the folder.
    """
    model = load_hf_gpt2(folder)
    state = {
        "format": PRETRAIN_FORMAT,
        "version": 1,
        "step": 0,
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.config),
        "source": {"hf_folder": str(Path(folder).resolve())},
    }
    out = Path(out)
    if out.suffix == ".pt":
        return _save_file(state, out)
    manager = CheckpointManager(WorkFolder(out).checkpoints(PRETRAIN))
    if manager.latest() is not None:
        raise HFFormatError(
            f"{out} already holds checkpoints (newest {manager.latest()}), "
            "which would hide the imported one; choose a new folder"
        )
    return manager.save(0, state)


def _save_file(state: dict, path: Path) -> Path:
    """A checkpoint at a name of the caller's choosing, atomic, with the usual sidecar."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    atomic_write_json(
        CheckpointManager.sidecar_for(path),
        {
            "format": PRETRAIN_FORMAT,
            "step": state["step"],
            "file": path.name,
            "bytes": path.stat().st_size,
            "sha256": sha256_file(path),
            "time": time.time(),
        },
    )
    return path


def export_hf(model: GPT, out: str | Path, source: str | Path = "the model") -> Path:
    """Write config.json and model.safetensors (published GPT-2 layout) into the folder out;
    refuses, before writing anything, a model of another architecture (source names it)."""
    from safetensors.torch import save_file

    if not model.config.gpt2_layout:
        raise HFFormatError(
            f"{source} is a model of pretrain.recipe modern (rotary, RMSNorm, untied head, ...), "
            "which the GPT-2 layout cannot hold and transformers has no class for; export it "
            "with --format safetensors (forge's tensor names and config)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to wte, as in the published files
        if CONV1D.search(key):
            tensor = tensor.t()
        tensors[key.removeprefix("transformer.")] = tensor.detach().float().cpu().contiguous()
    atomic_write(out / "model.safetensors",
                 lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", hf_config(model.config))
    return out


FORGE_EXPORT_FORMAT = "forge-gpt-safetensors"


def export_forge(model: GPT, out: str | Path) -> Path:
    """Write model.safetensors (forge's tensor names, fp32) and forge_config.json (the format
    and GPTConfig) into the folder out: any recipe, read back by load_forge_export. The model
    itself is moved to fp32 on the CPU (safetensors' save_model keeps tied weights once)."""
    from safetensors.torch import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu()
    atomic_write(out / "model.safetensors", lambda tmp: save_model(model, str(tmp)))
    atomic_write_json(out / "forge_config.json", {"format": FORGE_EXPORT_FORMAT,
                                                  "model_config": dataclasses.asdict(model.config)})
    return out


def load_forge_export(folder: str | Path) -> GPT:
    """The model of a folder written by export_forge, in eval mode on the CPU."""
    from safetensors.torch import load_model

    folder = Path(folder)
    config_path = folder / "forge_config.json"
    if not config_path.is_file():
        raise HFFormatError(f"{config_path} is missing; export the folder with "
                            "`forge export CHECKPOINT OUT --format safetensors`")
    saved = json.loads(config_path.read_text())
    if saved.get("format") != FORGE_EXPORT_FORMAT:
        raise HFFormatError(f"{config_path} is not a forge export (format "
                            f"{saved.get('format')!r}, expected {FORGE_EXPORT_FORMAT!r})")
    model = GPT(GPTConfig(**saved["model_config"]))
    load_model(model, str(folder / "model.safetensors"))
    return model.eval()
