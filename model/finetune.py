"""Instruction fine-tuning (Raschka ch. 7), on pretraining's runtime (model/runtime.py).

run_finetune() trains a pretrained (or imported) GPT on Alpaca-format records into
<workdir>/finetune/:

    log.jsonl            one JSON record per logged step and validation loss
    checkpoints/         ckpt-NNNNNN.pt + .json sidecars, the newest K (a LoRA run's hold only
                         the adapters, plus the path and sha256 of the base checkpoint)
    test_responses.json  the test split answered by the final model, beside the references,
                         with ROUGE-L F1 and token F1 per record and on average
    loss.png, manifest.json (config, base, data files and hashes, counts, drops, summary)

Each file is split with pipeline.instructions.split_records, the split decontamination uses,
so the test records are held out of training here and removed from the pretraining corpus
there. A record becomes the Alpaca prompt plus its output and <|endoftext|>; a batch is padded
with <|endoftext|> to its longest record, and the padding (and, by default, the prompt) gets
target -100. Bad records never stop a run: each is dropped and counted under its reason.
What is fine-tuning's own: that data, the loss weighted per response token, LoRA, and the
test split answered at the end; the runtime does the rest, resume included: rerunning
continues from the newest checkpoint, `--overwrite` starts over.

    forge finetune --config configs/demo.yaml [--overwrite]
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from model.checkpoint import FINETUNE_FORMAT, CheckpointError
from model.finetune_config import FinetuneConfig, FinetuneConfigError
from model.generate import Engine, Request, SamplingParams
from model.gpt import GPT, IGNORE_INDEX
from model.inference import format_prompt, load_model, resolve_checkpoint, sha256_file
from model.lora import apply_lora, lora_state_dict, merge_lora
from model.runtime import MicroBatch, ProgressFn, TrainingRun, train
from pipeline.encoding import EOT_ID, get_encoding
from pipeline.files import FINETUNE, atomic_write_json, config_hash
from pipeline.instructions import load_records, record_key, split_records

log = logging.getLogger("model.finetune")

SPLITS = ("train", "val", "test")


class FinetuneError(RuntimeError):
    """Fine-tuning cannot start or continue; the message says why and what to do."""


# ---------------------------------------------------------------- data


@dataclass
class Example:
    """One record as tokens: the prompt, then the response ending with <|endoftext|>."""

    prompt: list[int]
    response: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.response)


def encode_record(enc: Any, record: dict) -> Example:
    """Prompt and response encoded apart (as at inference: the prompt, then generation);
    special-token text inside a record is plain text, never a real <|endoftext|>."""
    prompt = enc.encode_ordinary(format_prompt(record["instruction"], record["input"]))
    return Example(prompt, enc.encode_ordinary(record["output"]) + [EOT_ID])


@dataclass
class InstructionData:
    """The split records, their examples, and the account of everything dropped."""

    records: dict[str, list[dict]]
    examples: dict[str, list[Example]]
    dropped: Counter
    files: list[dict]
    records_in: int
    fingerprint: str

    def counts(self) -> dict[str, int]:
        return {name: len(self.examples[name]) for name in SPLITS}


def load_instruction_data(paths: list[str], enc: Any, max_len: int, split_seed: int,
                          val_fraction: float, test_fraction: float) -> InstructionData:
    """Read, split, de-duplicate and encode instruction files; count every record dropped.

    Each file is split on its own (as decontamination splits it); then a train or val record
    that also appears in a test split (files can overlap) or earlier in train/val is dropped,
    and so is a record of more than max_len tokens or with text that cannot be encoded.
    """
    if not paths:
        raise FinetuneConfigError("finetune.data is empty; list Alpaca-format JSON/JSONL files "
                                  "(or pass --data FILE)")
    records: dict[str, list[dict]] = {name: [] for name in SPLITS}
    dropped: Counter = Counter()
    files, records_in = [], 0
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FinetuneConfigError(
                f"finetune.data: {path} does not exist; give Alpaca-format JSON/JSONL files"
            )
        try:
            good, bad = load_records(path)
        except (ValueError, OSError, EOFError) as e:  # not JSON at all, or a broken archive
            raise FinetuneError(f"{path} is not a readable JSON or JSONL file: {e}") from None
        valid = [r for r in good if _encodable(r)]  # a lone surrogate breaks the split's hash
        if len(valid) < len(good):
            bad["invalid_unicode"] += len(good) - len(valid)
        good = valid
        parts = split_records(good, split_seed, val_fraction, test_fraction)
        for split in SPLITS:
            records[split] += parts[split]
        dropped.update(bad)
        records_in += len(good) + sum(bad.values())
        files.append({"path": str(path), "sha256": sha256_file(path),
                      "records": len(good) + sum(bad.values()), "valid": len(good),
                      "dropped": dict(bad)})
    test_keys = {record_key(r) for r in records["test"]}
    seen: set[str] = set()
    for split in ("train", "val"):
        kept = []
        for record in records[split]:
            key = record_key(record)
            if key in test_keys:
                dropped["in_test_split"] += 1
            elif key in seen:
                dropped["duplicate"] += 1
            else:
                seen.add(key)
                kept.append(record)
        records[split] = kept
    examples: dict[str, list[Example]] = {}
    for split in SPLITS:
        kept_records, kept_examples = [], []
        for record in records[split]:
            try:
                example = encode_record(enc, record)
            except (ValueError, TypeError):  # text the tokenizer refuses
                dropped["bad_text"] += 1
                continue
            if len(example) > max_len:
                dropped["too_long"] += 1
                continue
            kept_records.append(record)
            kept_examples.append(example)
        records[split], examples[split] = kept_records, kept_examples
    payload = json.dumps(
        [[f["sha256"] for f in files], split_seed, val_fraction, test_fraction, max_len]
    )
    return InstructionData(records, examples, Counter(dict(sorted(dropped.items()))), files,
                           records_in, hashlib.sha256(payload.encode()).hexdigest()[:16])


def _encodable(record: dict) -> bool:
    try:
        record_key(record).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Batch(NamedTuple):
    x: torch.Tensor  # (B, T) inputs, padded with <|endoftext|>
    y: torch.Tensor  # (B, T) targets, -100 at padding (and prompt, when masked)
    tokens: int  # real (unpadded) input positions
    targets: int  # positions that count in the loss


def collate(examples: list[Example], mask_prompt: bool, pad_id: int = EOT_ID) -> Batch:
    """Pad to the longest example; targets are the inputs shifted by one, -100 where ignored."""
    T = max(len(e) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    tokens = 0
    for i, e in enumerate(examples):
        seq = torch.tensor(e.prompt + e.response, dtype=torch.long)
        n = len(seq) - 1
        x[i, :n], y[i, :n] = seq[:-1], seq[1:]
        if mask_prompt:
            y[i, : len(e.prompt) - 1] = IGNORE_INDEX  # targets that are prompt tokens
        tokens += n
    return Batch(x, y, tokens, int((y != IGNORE_INDEX).sum()))


class InstructionLoader:
    """Batches of examples in a seeded order per epoch; its position is part of a checkpoint.

    The last batch of an epoch is short rather than dropped, so every record is seen once
    per epoch. shuffle=False visits the examples in order (validation).
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int = 0,
                 shuffle: bool = True, mask_prompt: bool = True) -> None:
        if not examples:
            raise FinetuneError("no examples to load")
        self.examples, self.batch_size = examples, batch_size
        self.seed, self.shuffle, self.mask_prompt = seed, shuffle, mask_prompt
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.examples)
            perm = (
                np.random.default_rng([self.seed, epoch]).permutation(n)
                if self.shuffle
                else np.arange(n)
            )
            self._order = (epoch, perm)
        return self._order[1]

    def next_batch(self) -> Batch:
        if self.position >= len(self.examples):
            self.epoch, self.position = self.epoch + 1, 0
        ids = self.order(self.epoch)[self.position : self.position + self.batch_size]
        self.position += len(ids)
        return collate([self.examples[i] for i in ids], self.mask_prompt)

    def first_batches(self, n: int | None = None) -> Iterator[Batch]:
        """The first n batches in storage order (all when n is None), whatever the state."""
        total = len(self.examples) if n is None else min(n * self.batch_size, len(self.examples))
        for start in range(0, total, self.batch_size):
            chunk = self.examples[start : min(start + self.batch_size, total)]
            yield collate(chunk, self.mask_prompt)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "examples": len(self.examples), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("examples", len(self.examples)),
                          ("batch_size", self.batch_size)):
            if int(state[key]) != mine:
                raise FinetuneError(
                    f"loader state was made with {key}={state[key]}, this "
                    f"run has {key}={mine}; resume with the original config"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------- scores


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lower-cased words: the longest common subsequence's precision and recall."""
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's F1: overlap of the bags of lower-cased words."""
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


TEST_ANSWERS = SamplingParams(temperature=0.0)  # greedy, with the default penalties
ANSWER_BATCH = 16  # test records answered together


def answer_records(
    model: GPT,
    enc: Any,
    records: list[dict],
    examples: list[Example],
    max_new_tokens: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    progress: ProgressFn | None = None,
) -> tuple[list[dict], dict]:
    """Each record answered (TEST_ANSWERS, batched, never past the context) and scored against
    its reference output; and the averages."""
    engine = Engine(model, enc, device)
    params = replace(TEST_ANSWERS, max_tokens=max_new_tokens)
    block = model.config.block_size
    rows = []
    for start in range(0, len(records), ANSWER_BATCH):
        chunk = examples[start : start + ANSWER_BATCH]
        fits = [i for i, e in enumerate(chunk) if len(e.prompt) < block]  # else: no answer
        with autocast:
            done = engine.generate([Request(chunk[i].prompt, params) for i in fits])
        texts = dict(zip(fits, (c.text.strip() for c in done), strict=True))
        for i, record in enumerate(records[start : start + ANSWER_BATCH]):
            response = texts.get(i, "")
            rows.append(
                {
                    **record,
                    "model_response": response,
                    "rouge_l_f1": round(rouge_l(response, record["output"]), 4),
                    "token_f1": round(token_f1(response, record["output"]), 4),
                }
            )
        if progress:
            progress(len(rows), len(records))
    n = len(rows)
    scores = {
        "records": n,
        "rouge_l_f1": round(100 * sum(r["rouge_l_f1"] for r in rows) / n, 2) if n else None,
        "token_f1": round(100 * sum(r["token_f1"] for r in rows) / n, 2) if n else None,
    }
    return rows, scores


# ---------------------------------------------------------------- the run


class Finetuning(TrainingRun):
    """A fine-tuning run: a base model (+ LoRA), instruction batches weighted by their response
    tokens, and the test split answered at the end. One process (no DDP)."""

    stage = FINETUNE
    format = FINETUNE_FORMAT

    def build(self, saved: dict | None) -> torch.nn.Module:
        cfg = self.cfg
        if self.dist.enabled:
            raise FinetuneError("fine-tuning runs in one process; start it without torchrun")
        # the base: what the run started from, or (fresh) the newest one under cfg.base
        if saved is not None:
            self.base = saved["base"]
            base_path = Path(self.base["path"])
            if not base_path.is_file() or sha256_file(base_path) != self.base["sha256"]:
                raise CheckpointError(
                    f"{self.resumed_from} was fine-tuned from {base_path}, which is gone or has "
                    "changed; restore it, or start over with --overwrite"
                )
        else:
            base_path = resolve_checkpoint(cfg.base_path(self.work.root)).resolve()
            self.base = {"path": str(base_path), "sha256": sha256_file(base_path)}
        raw, base_state = load_model(base_path, dropout=cfg.dropout)
        self.base["step"] = base_state.get("step")
        self.enc = get_encoding(cfg.vocab_dir)
        gpt = raw.config
        if gpt.vocab_size < self.enc.n_vocab:
            raise FinetuneError(
                f"the base model {base_path} has a vocabulary of {gpt.vocab_size} tokens, fewer "
                f"than GPT-2's {self.enc.n_vocab}: it was not trained on GPT-2 tokens"
            )
        max_len = min(cfg.max_length or gpt.block_size + 1, gpt.block_size + 1)

        # data: a bad file fails before any training; bad records are counted
        self.data = load_instruction_data(
            cfg.data, self.enc, max_len, cfg.split_seed, cfg.val_fraction, cfg.test_fraction
        )
        counts = self.data.counts()
        if counts["train"] == 0:
            raise FinetuneError(
                f"no usable training record in {cfg.data} (dropped: "
                f"{dict(self.data.dropped)}); check the files and max_length"
            )
        self.train_loader = InstructionLoader(
            self.data.examples["train"], cfg.micro_batch_size, cfg.seed, mask_prompt=cfg.mask_prompt
        )
        val = self.data.examples["val"]
        self.val_loader = (InstructionLoader(val, cfg.micro_batch_size, shuffle=False)
                           if val else None)
        self.max_steps = cfg.max_steps or math.ceil(
            cfg.epochs * self.train_loader.batches_per_epoch / cfg.grad_accum_steps
        )
        if cfg.warmup_steps > self.max_steps:
            raise FinetuneConfigError(
                f"finetune.warmup_steps {cfg.warmup_steps} exceeds the run's {self.max_steps} "
                "steps; lower it"
            )
        if cfg.method == "lora":
            lora = cfg.lora
            apply_lora(raw, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        return raw.to(self.device)

    def next_batches(self) -> tuple[list[MicroBatch], Counter]:
        """grad_accum_steps batches, each weighted by its share of the step's response tokens:
        the loss is the mean over every response token, as one big padded batch would give."""
        batches = [self.train_loader.next_batch() for _ in range(self.cfg.grad_accum_steps)]
        targets = sum(b.targets for b in batches)
        counts = Counter(tokens=sum(b.tokens for b in batches), targets=targets,
                         positions=sum(b.x.numel() for b in batches))
        return [(b.x, b.y, b.targets / targets) for b in batches], counts

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
        """The val split, prompt always masked: the loss per response token."""
        if self.val_loader is None:
            return None
        return ((b.x, b.y) for b in self.val_loader.first_batches(self.cfg.eval_batches))

    def state_fields(self) -> dict:
        lora = self.cfg.method == "lora"
        return {"method": self.cfg.method, "base": self.base,
                "lora": self.cfg.lora.model_dump(mode="json") if lora else None,
                "data_fingerprint": self.data.fingerprint,
                **({"model": lora_state_dict(self.raw)} if lora else {})}  # the adapters only

    def load_fields(self, state: dict, path: Path) -> None:
        problems = []
        if state.get("method") != self.cfg.method:
            problems.append(f"method {state.get('method')!r}, config {self.cfg.method!r}")
        lora = self.cfg.lora.model_dump(mode="json")
        if state.get("method") == "lora" and state.get("lora") != lora:
            problems.append(f"lora {state.get('lora')}, config {lora}")
        if state.get("data_fingerprint") != self.data.fingerprint:
            problems.append(
                "other instruction data or split (finetune.data, split_seed, "
                "val_fraction, test_fraction or max_length changed)"
            )
        if problems:
            raise CheckpointError(
                f"checkpoint {path} was made by another fine-tuning run: "
                f"{'; '.join(problems)}; use its config or --overwrite"
            )
        if state["method"] == "lora":
            missing = set(lora_state_dict(self.raw)) - set(state["model"])
            if missing:
                raise CheckpointError(f"{path} lacks adapters {sorted(missing)[:3]}")
            self.raw.load_state_dict(state["model"], strict=False)
        else:
            self.raw.load_state_dict(state["model"])

    def start_fields(self) -> dict:
        cfg = self.cfg
        return {"method": cfg.method, "records": self.data.counts(),
                "dropped": dict(self.data.dropped), "base": self.base["path"],
                "records_per_step": f"{cfg.micro_batch_size} x {cfg.grad_accum_steps}"}

    def record_fields(self, counts: Counter, since: Counter, seconds: float) -> dict:
        return {"targets": counts["targets"], "positions_per_s": since["positions"] / seconds,
                "padding": 1 - counts["tokens"] / counts["positions"],
                "epoch": self.train_loader.epoch}

    def summary_fields(self, trains: list[dict], timed: Counter, checkpoint: Path | None,
                       finished: bool) -> dict:
        """The test split answered (once finished), the data's account and the padding."""
        scores = self.test(checkpoint) if finished else None
        return {
            "method": self.cfg.method,
            "test": scores,
            "records": self.data.counts(),
            "records_in": self.data.records_in,
            "dropped": dict(self.data.dropped),
            "positions_per_s": timed["positions"] / timed["seconds"] if timed["seconds"] else None,
            "padding": (sum(r["padding"] for r in trains) / len(trains)) if trains else None,
            "base": self.base,
            "test_responses": str(self.work.test_responses) if scores else None,
        }

    def manifest_fields(self) -> dict:
        return {"config_hash": config_hash(self.cfg, self.base["sha256"], self.data.fingerprint),
                "data": self.data.files, "data_fingerprint": self.data.fingerprint}

    def test(self, checkpoint: Path | None) -> dict | None:
        """Answer the test split with the final model into test_responses.json, once."""
        cfg = self.cfg
        records = self.data.records["test"][: cfg.test_limit]
        examples = self.data.examples["test"][: cfg.test_limit]
        if not cfg.test_generate or not records:
            return None
        path = self.work.test_responses
        sha = sha256_file(checkpoint) if checkpoint else None
        decoding = {
            "temperature": TEST_ANSWERS.temperature,
            "frequency_penalty": TEST_ANSWERS.frequency_penalty,
            "presence_penalty": TEST_ANSWERS.presence_penalty,
            "max_new_tokens": cfg.test_max_new_tokens,
        }
        with contextlib.suppress(OSError, ValueError, KeyError):
            done = json.loads(path.read_text())
            if (
                done["checkpoint_sha256"] == sha
                and done["decoding"] == decoding
                and len(done["responses"]) == len(records)
            ):
                return done["scores"]
        # LoRA: answer with merged weights (faster), leaving the trained adapters as they are
        model = merge_lora(copy.deepcopy(self.raw)) if cfg.method == "lora" else self.raw
        model.eval()
        t0 = time.perf_counter()

        def report(done: int, total: int) -> None:
            log.info("test split: %d/%d answered (%.0fs)", done, total, time.perf_counter() - t0)

        rows, scores = answer_records(
            model,
            self.enc,
            records,
            examples,
            cfg.test_max_new_tokens,
            self.device,
            self.autocast,
            report,
        )
        self.raw.train()
        scores["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(
            path,
            {
                "checkpoint": str(checkpoint),
                "checkpoint_sha256": sha,
                "decoding": decoding,
                "scores": scores,
                "responses": rows,
            },
        )
        log.info(
            "test split: ROUGE-L F1 %.2f, token F1 %.2f over %d records -> %s",
            scores["rouge_l_f1"],
            scores["token_f1"],
            scores["records"],
            path,
        )
        return scores


def run_finetune(cfg: FinetuneConfig, workdir: Path, overwrite: bool = False,
                 progress: ProgressFn | None = None) -> dict:
    """Fine-tune as cfg says into <workdir>/finetune; returns the summary.

    Continues from the newest checkpoint (a finished run only re-reports); overwrite deletes
    the previous run's checkpoints, log and answers and starts over.
    """
    return train(Finetuning, cfg, workdir, overwrite, progress)
