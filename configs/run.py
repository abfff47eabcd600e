"""The whole run config: the data stages' sections plus pretraining and fine-tuning.

It composes `pipeline` (the data sections) and `model` (the training sections), so it lives
above both: the commands and the flows read it; `pipeline` and `model` never do. The YAML
files beside this module are such configs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, model_validator

from model.config import PretrainConfig, PretrainConfigError
from model.finetune_config import FinetuneConfig, FinetuneConfigError
from pipeline.config import ForgeConfig, explain, load_config


class RunConfig(ForgeConfig):
    """A whole run: the data stages plus training; the `forge` commands and flows read this."""

    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    @model_validator(mode="after")
    def _offline_vocabulary(self) -> RunConfig:
        """Training encodes text (samples, instructions) with the data stages' vocabulary."""
        for section in (self.pretrain, self.finetune):
            if section.vocab_dir is None and self.data.tokenize.vocab_dir:
                section.vocab_dir = self.data.tokenize.vocab_dir
        return self


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read and validate a YAML run config; `overrides` are dotted keys (`workdir`)."""
    return load_config(path, overrides, schema=RunConfig)


def data_config(cfg: ForgeConfig) -> ForgeConfig:
    """The data stages' part of a run config (a RunConfig also holds the training sections)."""
    if type(cfg) is ForgeConfig:
        return cfg
    return ForgeConfig.model_validate(cfg.model_dump(include=set(ForgeConfig.model_fields)))


TRAINING_ERRORS = {"pretrain": PretrainConfigError, "finetune": FinetuneConfigError}


def load_training_section(path: str | Path, name: str) -> tuple[Path, BaseModel]:
    """`workdir` and one training section (`pretrain` or `finetune`) of a YAML run config."""
    cfg = load_run_config(path)
    return Path(cfg.workdir), getattr(cfg, name)


def validate_training_section(name: str, section: dict, origin: str = "config") -> BaseModel:
    """A training section from a dict, with errors as one line per field (`<name>.<field>`)."""
    try:
        return getattr(RunConfig.model_validate({name: section}), name)
    except ValidationError as e:
        raise TRAINING_ERRORS[name](explain(e, origin)) from None
