"""Run configuration: YAML validated by pydantic.

The same models are the Prefect flow parameters, so every field carries a description
(the UI shows it) and unknown keys are rejected: a typo fails before any work, naming
the field.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration problem, reported as one sentence that names the field and the fix."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Strict):
    uri: str = Field(
        description="Local path or glob, http(s) URL, or hf://DATASET (a Hub name or a local "
        "dataset folder) streamed with the `datasets` library."
    )
    name: str | None = Field(
        default=None, description="Label recorded on every document (default: from the URI)."
    )
    sha256: str | None = Field(
        default=None, description="Expected sha256 of a downloaded URL; a mismatch fails the file."
    )
    text_field: str = Field(default="text", description="Field holding the text in JSONL/parquet.")
    hf_config: str | None = Field(default=None, description="Dataset config name (hf:// only).")
    hf_split: str = Field(default="train", description="Dataset split (hf:// only).")
    max_docs: int | None = Field(
        default=None, ge=1, description="Stop after this many documents (hf:// only)."
    )

    @field_validator("uri")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class DownloadConfig(Strict):
    mirror: dict[str, str] = Field(
        default_factory=dict,
        description="URL prefix -> local folder or other base URL, for air-gapped clusters.",
    )
    retries: int = Field(default=5, ge=0, description="Retries per URL after the first attempt.")
    backoff_s: float = Field(default=1.0, ge=0, description="First retry delay; doubles each time.")
    timeout_s: float = Field(default=60.0, gt=0, description="Socket timeout per request.")
    max_file_mb: float = Field(default=50_000, gt=0, description="Refuse files larger than this.")
    hf_docs_per_part: int = Field(
        default=50_000, ge=1, description="Documents per committed part when streaming hf://."
    )


class ExtractConfig(Strict):
    strip_gutenberg: bool = Field(
        default=True, description="Cut Project Gutenberg START/END licence boilerplate."
    )
    max_doc_mb: float = Field(
        default=20.0, gt=0, description="Documents larger than this are dropped (too_large)."
    )
    archive_members_per_unit: int = Field(
        default=64, ge=1, description="Archive members per work unit (parallelism inside zips)."
    )


class EvalSetConfig(Strict):
    name: str = Field(description="Label used in the drop reason, e.g. hellaswag.")
    path: str = Field(description="File holding the evaluation data.")
    format: Literal["hellaswag", "text", "instructions"] = Field(
        description="hellaswag: 6-line items (context, label, 4 endings); text: plain or .gz "
        "text; instructions: Alpaca JSON/JSONL, only its held-out test split is used."
    )
    seed: int = Field(default=1337, description="instructions: seed of the split.")
    val_fraction: float = Field(default=0.05, ge=0, lt=1, description="instructions: val share.")
    test_fraction: float = Field(default=0.10, gt=0, lt=1,
                                 description="instructions: test share (held out).")


class DecontaminateConfig(Strict):
    enabled: bool = Field(default=False, description="Run the decontamination stage.")
    ngram: int = Field(default=13, ge=5, description="Words per n-gram (GPT-3 used 13).")
    mode: Literal["drop", "cut"] = Field(
        default="drop",
        description="drop the document, or cut the matching spans (plus `cut_margin_chars` "
        "either side) and keep the rest",
    )
    cut_margin_chars: int = Field(default=200, ge=0, description="Context removed around a hit.")
    eval_sets: list[EvalSetConfig] = Field(
        default_factory=list, description="Evaluation sets whose n-grams must not be trained on."
    )


class TokenizeConfig(Strict):
    encoding: Literal["gpt2"] = Field(default="gpt2", description="tiktoken encoding.")
    vocab_dir: str | None = Field(
        default=None,
        description="Folder with encoder.json, vocab.bpe, gpt2.tiktoken for offline use; "
        "unset online (tiktoken downloads and caches them).",
    )
    shard_tokens: int = Field(
        default=100_000_000, ge=1024, description="Target tokens per shard (closes at a doc end)."
    )
    val_fraction: float = Field(
        default=0.01, ge=0, lt=1, description="Fraction of documents held out for validation."
    )
    seed: int = Field(default=1337, description="Seed of the train/val document split.")


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(min_length=1, description="Where the corpus comes from.")
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)


class ForgeConfig(Strict):
    workdir: str = Field(default="runs/default", description="Folder for every stage's output.")
    workers: int = Field(default=2, ge=1, description="Worker processes for data stages.")
    data: DataConfig


def load_config(path: str | Path, overrides: dict | None = None) -> ForgeConfig:
    """Read and validate a YAML config; `overrides` are dotted keys (`data.sources`, `workdir`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass an existing --config") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return validate_config(raw, origin=str(path))


def validate_config(raw: dict, origin: str = "config") -> ForgeConfig:
    try:
        return ForgeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, origin)) from None


def _explain(error: ValidationError, origin: str) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown field '{field}'; check its spelling")
        elif item["type"] == "missing":
            lines.append(f"{origin}: field '{field}' is required")
        else:
            got = item.get("input")
            lines.append(f"{origin}: field '{field}' {item['msg'].lower()} (got {got!r})")
    return "\n".join(lines)


def config_hash(section: BaseModel, *upstream: str) -> str:
    """A stable hash of a config section plus upstream fingerprints: what decides the output."""
    payload = json.dumps(section.model_dump(mode="json"), sort_keys=True) + "|".join(upstream)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
