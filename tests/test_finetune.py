"""Fine-tuning: records, split, padding and masking, LoRA, checkpoints, exact resume, scores.

Models are the "tiny" preset (2 layers, width 64) with GPT-2's real vocabulary, pretrained for
a few steps on a synthetic token dataset (test_loader.make_dataset) so that fine-tuning starts
from a real pretraining checkpoint; instruction data is synthetic or the 1,100-record set.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DATA, VOCAB
from test_loader import make_dataset

from configs.run import load_training_section, validate_training_section
from model.chat import Chat, GenerationSettings
from model.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from model.config import PretrainConfig
from model.finetune import (
    FinetuneError,
    InstructionLoader,
    collate,
    encode_record,
    load_instruction_data,
    rouge_l,
    run_finetune,
    token_f1,
)
from model.finetune_config import FinetuneConfig, FinetuneConfigError
from model.gpt import GPT, IGNORE_INDEX, GPTConfig
from model.inference import format_prompt, load_model, resolve_checkpoint
from model.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from model.runtime import read_log
from model.train import run_pretrain
from pipeline.config import EvalSetConfig
from pipeline.encoding import EOT_ID, get_encoding
from pipeline.instructions import load_records, record_key, split_records

REPO = Path(__file__).resolve().parents[1]
INSTRUCT = DATA / "instruct" / "rasbt-instruction-data.json"
WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "music", "table", "light", "sand"]
ANSWER = "Forty-two is the answer."


@pytest.fixture(scope="module")
def enc():
    return get_encoding(str(VOCAB))


# ---------------------------------------------------------------- shared builders


def make_pretrained(root: Path, recipe: str = "gpt2") -> Path:
    """A work folder with a tiny GPT-2-vocabulary model pretrained for 3 steps."""
    dataset = make_dataset(root / "data", train_sizes=(20_000,), val_size=2_000, vocab=50257)
    cfg = PretrainConfig(
        recipe=recipe,
        preset="tiny",
        dataset=str(dataset),
        micro_batch_size=4,
        total_batch_tokens=512,
        max_steps=3,
        warmup_steps=1,
        eval_every=0,
        eval_batches=1,
        checkpoint_every=0,
        num_threads=1,
        verify_data=False,
    )
    run_pretrain(cfg, root / "work")
    return root / "work"


def synthetic_records(n: int, answer: str | None = None) -> list[dict]:
    """Distinct short records; the answer is fixed (learnable) or varies in length."""
    return [
        {
            "instruction": f"Name item {i}: {WORDS[i % 10]} {WORDS[(i * 3) % 10]}",
            "input": WORDS[(i * 7) % 10] if i % 3 == 0 else "",
            "output": answer or " ".join(WORDS[(i + k) % 10] for k in range(1 + i % 6)),
        }
        for i in range(n)
    ]


def write_json(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def shared_dir(factory: pytest.TempPathFactory, name: str) -> tuple[Path, bool]:
    """A folder shared by every test module of the session; True when already built."""
    folder = factory.getbasetemp() / name
    return folder, (folder / "done").exists()


def pretrained_workdir(factory: pytest.TempPathFactory) -> Path:
    folder, done = shared_dir(factory, "forge-pretrained")
    if not done:
        make_pretrained(folder)
        (folder / "done").touch()
    return folder / "work"


def taught_workdir(factory: pytest.TempPathFactory) -> Path:
    """The pretrained model fully fine-tuned to answer every instruction with ANSWER."""
    base = pretrained_workdir(factory)
    folder, done = shared_dir(factory, "forge-taught")
    if not done:
        data = write_json(folder / "answer.json", synthetic_records(120, ANSWER))
        cfg = FinetuneConfig(
            base=str(base),
            data=[str(data)],
            max_steps=30,
            lr=3e-3,
            micro_batch_size=4,
            eval_every=0,
            checkpoint_every=0,
            num_threads=1,
            vocab_dir=str(VOCAB),
            test_max_new_tokens=12,
        )
        run_finetune(cfg, folder / "work")
        (folder / "done").touch()
    return folder / "work"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pretrained_workdir(tmp_path_factory)


def tiny_finetune(base: Path, data: Path, **overrides) -> FinetuneConfig:
    settings = dict(
        base=str(base),
        data=[str(data)],
        max_steps=6,
        lr=1e-3,
        micro_batch_size=4,
        eval_every=3,
        checkpoint_every=3,
        num_threads=1,
        vocab_dir=str(VOCAB),
        test_limit=3,
        test_max_new_tokens=8,
    )
    return FinetuneConfig(**{**settings, **overrides})


# ---------------------------------------------------------------- records and the split


def test_prompt_is_the_alpaca_template(enc) -> None:
    assert format_prompt("Sort the list.", "3, 1, 2") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSort the list.\n\n### Input:\n3, 1, 2"
        "\n\n### Response:\n"
    )
    assert "### Input" not in format_prompt("Say hi.")
    record = {"instruction": "Say <|endoftext|> aloud.", "input": "", "output": "Hi."}
    example = encode_record(enc, record)
    assert example.prompt == enc.encode_ordinary(format_prompt(record["instruction"]))
    assert example.response == enc.encode_ordinary("Hi.") + [EOT_ID]
    assert EOT_ID not in example.prompt  # special-token text in a record is plain text


def test_padding_and_prompt_masking(enc) -> None:
    short = encode_record(enc, {"instruction": "A", "input": "", "output": "B"})
    long = encode_record(enc, {"instruction": "Longer one", "input": "x", "output": "C D E F"})
    batch = collate([short, long], mask_prompt=True)
    T = len(long) - 1
    assert batch.x.shape == batch.y.shape == (2, T)
    seq = short.prompt + short.response
    n = len(seq) - 1
    assert batch.x[0, :n].tolist() == seq[:-1]
    assert (batch.x[0, n:] == EOT_ID).all()  # padded with end-of-text
    assert (batch.y[0, n:] == IGNORE_INDEX).all()  # ... that is not learned
    p = len(short.prompt)
    assert (batch.y[0, : p - 1] == IGNORE_INDEX).all()  # prompt masked
    assert batch.y[0, p - 1 : n].tolist() == short.response  # response and its EOT learned
    assert batch.targets == len(short.response) + len(long.response)
    assert batch.tokens == n + T
    unmasked = collate([short, long], mask_prompt=False)
    assert unmasked.y[0, :n].tolist() == seq[1:] and (unmasked.y[0, n:] == IGNORE_INDEX).all()
    assert unmasked.targets == n + T


def test_bad_records_are_counted_by_reason(tmp_path: Path, enc) -> None:
    good = synthetic_records(40)
    bad_json = [
        {"instruction": "no output"},
        {"instruction": 3, "input": "", "output": "x"},
        {"instruction": "empty", "input": "", "output": "  "},
        {"instruction": "long", "input": "", "output": "word " * 300},
        {"instruction": "surrogate \ud800", "input": "", "output": "x"},
        {"instruction": "rejected", "input": "", "output": "x", "status": "too similar"},
        "not an object",
        good[0],  # a duplicate
    ]
    first = write_json(tmp_path / "a.json", good + bad_json)
    # a second file overlapping the first one's test split, where those records land in train
    held_out = split_records(good, 1337, 0.1, 0.2)["test"]
    more = [{**r, "output": r["output"] + " again"} for r in synthetic_records(200)]
    second = tmp_path / "b.jsonl"
    second.write_text("\n".join([json.dumps(r) for r in held_out + more] + ["{broken"]) + "\n")
    data = load_instruction_data([str(first), str(second)], enc, 129, 1337, 0.1, 0.2)
    dropped = data.dropped
    for reason in (
        "missing_output",
        "non_string_instruction",
        "empty_output",
        "too_long",
        "invalid_unicode",
        "status_not_ok",
        "not_an_object",
        "malformed_json",
        "duplicate",
    ):
        assert dropped[reason] >= 1, reason
    # every record is accounted for: kept + dropped = read
    kept = sum(len(v) for v in data.examples.values())
    assert data.records_in == 48 + len(held_out) + 200 + 1
    assert kept + sum(dropped.values()) == data.records_in
    # no record of any file's test split is trained on
    test_keys = {record_key(r) for r in data.records["test"]}
    trained = [record_key(r) for s in ("train", "val") for r in data.records[s]]
    assert not test_keys & set(trained) and len(trained) == len(set(trained))
    assert dropped["in_test_split"] >= 1


def test_split_is_the_decontamination_split(enc) -> None:
    """The held-out test records are exactly those the decontamination stage removes."""
    cfg = FinetuneConfig()
    spec = EvalSetConfig(name="instruct-test", path=str(INSTRUCT), format="instructions")
    assert (cfg.split_seed, cfg.val_fraction, cfg.test_fraction) == (
        spec.seed,
        spec.val_fraction,
        spec.test_fraction,
    )
    data = load_instruction_data(
        [str(INSTRUCT)], enc, 1025, cfg.split_seed, cfg.val_fraction, cfg.test_fraction
    )
    records, _ = load_records(INSTRUCT)
    expected = split_records(records, spec.seed, spec.val_fraction, spec.test_fraction)
    assert data.records["test"] == expected["test"]
    assert data.counts() == {"train": 935, "val": 55, "test": 110}  # Raschka's 85/5/10
    assert not {record_key(r) for r in data.records["test"]} & {
        record_key(r) for r in data.records["train"] + data.records["val"]
    }


def test_loader_order_epochs_and_state(enc) -> None:
    examples = [encode_record(enc, r) for r in synthetic_records(10)]
    loader = InstructionLoader(examples, batch_size=4, seed=3)
    assert loader.batches_per_epoch == 3
    sizes = [loader.next_batch().x.size(0) for _ in range(3)]
    assert sizes == [4, 4, 2] and loader.epoch == 0  # the last batch is short, not dropped
    seen = Counter(int(i) for i in loader.order(0))
    assert sorted(seen) == list(range(10)) and set(seen.values()) == {1}
    state = loader.state_dict()
    a = [loader.next_batch().x for _ in range(4)]
    again = InstructionLoader(examples, batch_size=4, seed=3)
    again.load_state_dict(state)
    assert all(
        torch.equal(x, y) for x, y in zip(a, [again.next_batch().x for _ in range(4)], strict=True)
    )
    assert list(loader.order(1)) != list(loader.order(0))  # a new order every epoch
    with pytest.raises(FinetuneError, match="batch_size"):
        InstructionLoader(examples, batch_size=5, seed=3).load_state_dict(state)


def test_scores() -> None:
    assert rouge_l("The cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS "the cat the mat" = 4 of 6 and 4 of 5 words
    assert rouge_l("the cat the mat", "the black cat on the mat") == pytest.approx(
        2 * (4 / 4) * (4 / 6) / (4 / 4 + 4 / 6)
    )
    assert rouge_l("mat the", "the mat") == pytest.approx(0.5)  # order matters
    assert token_f1("mat the", "the mat") == 1.0  # a bag of words: it does not
    assert rouge_l("", "something") == 0.0 and token_f1("x", "y") == 0.0


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "section, needle",
    [
        ({"lrr": 1e-3}, "unknown field 'finetune.lrr'"),
        ({"lora": {"rank": 4}}, "unknown field 'finetune.lora.rank'"),
        ({"method": "qlora"}, "finetune.method"),
        ({"lr": 1e-5, "min_lr": 1e-4}, "min_lr"),
        ({"max_steps": 5, "warmup_steps": 9}, "warmup_steps"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leave records"),
        ({"lora": {"target_modules": ["lm_head"]}}, "lm_head"),
    ],
)
def test_bad_config_is_refused(section: dict, needle: str) -> None:
    with pytest.raises(FinetuneConfigError, match=needle):
        validate_training_section("finetune", section)


def test_yaml_section_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "workdir": "runs/x",
                "data": {"tokenize": {"vocab_dir": "v"}},
                "finetune": {"method": "lora", "lora": {"r": 4}},
            }
        )
    )
    workdir, cfg = load_training_section(path, "finetune")
    assert workdir == Path("runs/x") and cfg.vocab_dir == "v" and cfg.method == "lora"
    assert (
        cfg.lora.r == 4
        and cfg.lora.alpha == 16
        and cfg.lora.target_modules == ["c_attn", "c_proj", "c_fc"]
    )
    assert (cfg.lr, cfg.weight_decay, cfg.micro_batch_size, cfg.epochs) == (5e-5, 0.1, 8, 2)
    assert cfg.mask_prompt and cfg.base_path(workdir) == Path("runs/x")
    for name, field in FinetuneConfig.model_fields.items():
        assert field.description, name


# ---------------------------------------------------------------- LoRA


def test_lora_starts_at_the_base_trains_only_adapters_and_merges() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    before = model(x)[0].detach()
    wrapped = apply_lora(model, r=4, alpha=8, dropout=0.0)
    assert len(wrapped) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    assert torch.equal(model(x)[0], before)  # B = 0: exactly the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert set(lora_state_dict(model)) == trainable
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.scaling == 2.0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B" in n:
                p.normal_(0, 0.1)
        inp = torch.randn(3, 32)
        want = inp @ layer.weight.T + layer.bias + 2.0 * (inp @ layer.lora_A.T @ layer.lora_B.T)
        assert torch.allclose(layer(inp), want, atol=1e-5)
    adapted = model(x)[0].detach()
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(x)[0], adapted, atol=1e-5)
    with pytest.raises(ValueError, match="match no Linear"):
        apply_lora(
            GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)),
            2,
            2,
            targets=["c_attention"],
        )


# ---------------------------------------------------------------- checkpoints of a work folder


def test_checkpoint_argument_resolution(pretrained: Path, tmp_path: Path) -> None:
    pre = CheckpointManager(pretrained / "pretrain" / "checkpoints").latest()
    assert resolve_checkpoint(pretrained) == pre  # no fine-tuning yet: the pretrained one
    assert resolve_checkpoint(pre) == pre
    assert resolve_checkpoint(pretrained / "pretrain") == pre
    # a work folder with both stages means the fine-tuned one, whatever the step numbers
    work = tmp_path / "work"
    CheckpointManager(work / "pretrain" / "checkpoints").save(500, {"w": torch.zeros(1)})
    assert resolve_checkpoint(work) == work / "pretrain" / "checkpoints" / "ckpt-000500.pt"
    half = work / "finetune" / "checkpoints" / "ckpt-000009.pt"
    half.parent.mkdir(parents=True)
    half.write_bytes(b"killed before its sidecar")
    assert resolve_checkpoint(work) == work / "pretrain" / "checkpoints" / "ckpt-000500.pt"
    CheckpointManager(work / "finetune" / "checkpoints").save(2, {"w": torch.zeros(1)})
    assert resolve_checkpoint(work) == work / "finetune" / "checkpoints" / "ckpt-000002.pt"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def full_run(pretrained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("full")
    data = write_json(root / "data.json", synthetic_records(60) + [{"instruction": "x"}])
    progress: list[tuple[int, int]] = []
    cfg = tiny_finetune(pretrained, data)
    summary = run_finetune(cfg, root / "work", progress=lambda d, t: progress.append((d, t)))
    assert progress[0] == (0, 6) and progress[-1] == (6, 6)
    return root, summary


def test_full_run_outputs(full_run: tuple[Path, dict], pretrained: Path) -> None:
    root, summary = full_run
    out = root / "work" / "finetune"
    assert summary["steps"] == 6 and summary["method"] == "full"
    assert summary["records"] == {"train": 51, "val": 3, "test": 6}
    assert summary["dropped"] == {"missing_output": 1} and summary["records_in"] == 61
    assert summary["val_loss"] < summary["val_loss_before"]
    assert 0 < summary["padding"] < 1 and summary["tokens_per_s"] > 0
    assert summary["trainable"] == summary["params"]
    records = read_log(out / "log.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 7))
    assert [r["step"] for r in records if r["kind"] == "val"] == [0, 3, 6]
    assert [s for s, _ in CheckpointManager(out / "checkpoints").complete()] == [3, 6]
    state = load_checkpoint(out / "checkpoints" / "ckpt-000006.pt")
    assert state["method"] == "full" and state["step"] == 6 and state["loader"]["position"] > 0
    sidecar = json.loads((out / "checkpoints" / "ckpt-000006.json").read_text())
    assert state["format"] == sidecar["format"] == "forge-finetune-checkpoint"
    base = CheckpointManager(pretrained / "pretrain" / "checkpoints").latest()
    assert state["base"]["path"] == str(base.resolve())
    assert resolve_checkpoint(root / "work") == out / "checkpoints" / "ckpt-000006.pt"
    answers = json.loads((out / "test_responses.json").read_text())
    assert answers["scores"]["records"] == 3 == len(answers["responses"])
    row = answers["responses"][0]
    assert {"instruction", "input", "output", "model_response", "rouge_l_f1", "token_f1"} <= set(
        row
    )
    assert summary["test"]["rouge_l_f1"] == answers["scores"]["rouge_l_f1"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "finetune" and manifest["dropped"] == {"missing_output": 1}
    assert manifest["data"][0]["sha256"] and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_resumes_and_overwrite_starts_over(
    full_run: tuple[Path, dict], pretrained: Path, tmp_path: Path
) -> None:
    root, summary = full_run
    cfg = tiny_finetune(pretrained, root / "data.json")
    again = run_finetune(cfg, root / "work")  # finished: nothing is retrained
    assert again["resumed_from"] == 6 and again["val_loss"] == summary["val_loss"]
    assert again["test"]["rouge_l_f1"] == summary["test"]["rouge_l_f1"]
    other = tiny_finetune(pretrained, root / "data.json", split_seed=7)
    with pytest.raises(CheckpointError, match="another fine-tuning run.*--overwrite"):
        run_finetune(other, root / "work")
    work = tmp_path / "work"
    shutil.copytree(root / "work", work)
    over = run_finetune(cfg.model_copy(update={"max_steps": 2}), work, overwrite=True)
    assert over["resumed_from"] is None and over["steps"] == 2
    assert [s for s, _ in CheckpointManager(work / "finetune" / "checkpoints").complete()] == [2]
    records = read_log(work / "finetune" / "log.jsonl")
    assert [r["kind"] for r in records].count("start") == 1


def test_learns_the_taught_answer(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fine-tuning works end to end: the test split is answered with the taught response."""
    work = taught_workdir(tmp_path_factory)
    answers = json.loads((work / "finetune" / "test_responses.json").read_text())
    assert answers["scores"]["rouge_l_f1"] == 100.0
    assert all(r["model_response"] == ANSWER for r in answers["responses"])


def test_lora_run_stores_only_adapters(pretrained: Path, tmp_path: Path) -> None:
    data = write_json(tmp_path / "data.json", synthetic_records(60))
    cfg = tiny_finetune(
        pretrained,
        data,
        method="lora",
        lr=1e-2,
        max_steps=4,
        eval_every=0,
        checkpoint_every=0,
        lora={"r": 4, "alpha": 8, "dropout": 0.1},
    )
    summary = run_finetune(cfg, tmp_path / "work")
    assert summary["trainable"] < summary["params"] / 50
    path = Path(summary["checkpoint"])
    state = load_checkpoint(path)
    assert state["method"] == "lora" and state["lora"]["r"] == 4
    assert state["model"] and all(".lora_" in k for k in state["model"])
    base_path = CheckpointManager(pretrained / "pretrain" / "checkpoints").latest()
    assert path.stat().st_size < base_path.stat().st_size / 10
    merged, _ = load_model(tmp_path / "work")
    unmerged, _ = load_model(tmp_path / "work", merge=False)
    base, _ = load_model(base_path)
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        assert torch.allclose(merged(x)[0], unmerged(x)[0], atol=1e-4)
        assert not torch.allclose(merged(x)[0], base(x)[0], atol=1e-4)  # the adapters matter
    # the base's bytes are part of the checkpoint's identity
    copy = tmp_path / "base-copy.pt"
    copy.write_bytes(base_path.read_bytes())
    state["base"]["path"] = str(copy)
    torch.save(state | {"model": lora_state_dict(unmerged)}, tmp_path / "moved.pt")
    assert load_model(tmp_path / "moved.pt")[0] is not None
    copy.write_bytes(copy.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="changed"):
        load_model(tmp_path / "moved.pt")


def test_modern_recipe_fine_tunes_full_and_lora_and_chats(tmp_path: Path, enc) -> None:
    """A model of the modern recipe (rotary, untied head, ...) fine-tunes fully and with LoRA,
    and its chat reply with the KV cache equals generation without one."""
    base = make_pretrained(tmp_path / "base", recipe="modern")
    data = write_json(tmp_path / "data.json", synthetic_records(60))
    full = run_finetune(tiny_finetune(base, data, max_steps=4, lr=3e-3, checkpoint_every=0,
                                      eval_every=4), tmp_path / "full")
    assert full["val_loss"] < full["val_loss_before"]
    lora = run_finetune(tiny_finetune(base, data, method="lora", lr=1e-2, max_steps=3,
                                      eval_every=0, checkpoint_every=0, lora={"r": 4}),
                        tmp_path / "lora")
    assert lora["trainable"] < lora["params"] / 50
    model, _ = load_model(tmp_path / "lora")
    assert model.config.rotary and not model.config.tie_embeddings
    chat = Chat(model, enc, GenerationSettings(temperature=0, max_new_tokens=10,
                                               frequency_penalty=0.0))
    reply = chat.reply("Name item 3: cloud sand")
    prompt = enc.encode_ordinary(format_prompt("Name item 3: cloud sand"))
    seq = list(prompt)  # greedy full forwards without a cache
    while seq[-1] != EOT_ID and len(seq) < len(prompt) + 10:
        seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    greedy = enc.decode([t for t in seq[len(prompt):] if t != EOT_ID])
    assert reply and greedy.strip().startswith(reply)  # a reply may end at a stop string


def test_unusable_data_fails_with_a_message(pretrained: Path, tmp_path: Path) -> None:
    with pytest.raises(FinetuneConfigError, match="does not exist"):
        run_finetune(tiny_finetune(pretrained, tmp_path / "missing.json"), tmp_path / "w")
    data = write_json(tmp_path / "bad.json", [{"instruction": "x", "output": ""}] * 3)
    with pytest.raises(FinetuneError, match="no usable training record.*empty_output"):
        run_finetune(tiny_finetune(pretrained, data), tmp_path / "w")


# ---------------------------------------------------------------- exact resume after SIGKILL


def train_records(workdir: Path) -> dict[int, dict]:
    return {
        r["step"]: r for r in read_log(workdir / "finetune" / "log.jsonl") if r["kind"] == "train"
    }


def last_step(workdir: Path) -> int:
    records = train_records(workdir) if (workdir / "finetune" / "log.jsonl").exists() else {}
    return max(records, default=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "sig"),
    [("full", signal.SIGKILL), ("lora", signal.SIGKILL), ("full", signal.SIGTERM)],
    ids=["full-SIGKILL", "lora-SIGKILL", "full-SIGTERM"],
)
def test_killed_run_resumes_with_identical_losses(
    pretrained: Path, tmp_path: Path, method: str, sig: signal.Signals
) -> None:
    """Rerunning `forge finetune` after a kill logs the same losses bit for bit as a run never
    interrupted (dropout on: the RNG states must come back too). SIGKILL falls back to the
    last periodic checkpoint; SIGTERM checkpoints the step in flight and exits with 143."""
    data = write_json(tmp_path / "data.json", synthetic_records(80))
    cfg = tiny_finetune(
        pretrained,
        data,
        method=method,
        max_steps=24,
        checkpoint_every=8,
        eval_every=12,
        dropout=0.1,
        grad_accum_steps=2,
        micro_batch_size=2,
        lora={"r": 4, "alpha": 8, "dropout": 0.1},
    )
    runs = {name: tmp_path / name for name in ("whole", "killed")}
    cmd = {}
    for name, workdir in runs.items():
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            yaml.safe_dump({"workdir": str(workdir), "finetune": cfg.model_dump(mode="json")})
        )
        cmd[name] = [
            sys.executable,
            "-m",
            "cli.main",
            "finetune",
            "--config",
            str(config),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.Popen(
        cmd["whole"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    victim = subprocess.Popen(
        cmd["killed"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while last_step(runs["killed"]) < 10:
            assert victim.poll() is None, victim.stderr.read().decode()
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.01)
        victim.send_signal(sig)
        victim.wait(timeout=120)
    finally:
        victim.kill()
    killed_at = last_step(runs["killed"])
    expected_code = 143 if sig == signal.SIGTERM else -signal.SIGKILL
    assert victim.returncode == expected_code, victim.stderr.read().decode()
    assert killed_at < 24
    resumed = subprocess.run(cmd["killed"], cwd=REPO, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert whole.wait(timeout=240) == 0, whole.stderr.read().decode()
    assert "resuming" in resumed.stderr
    resumes = [
        r for r in read_log(runs["killed"] / "finetune" / "log.jsonl") if r["kind"] == "resume"
    ]
    if sig == signal.SIGTERM:
        assert [r["step"] for r in resumes] == [killed_at]
    else:
        assert [r["step"] for r in resumes] in ([8], [16]) and resumes[0]["step"] <= killed_at

    expected, got = train_records(runs["whole"]), train_records(runs["killed"])
    assert sorted(got) == sorted(expected) == list(range(1, 25))
    for step in expected:
        for key in ("loss", "lr", "grad_norm", "targets"):
            assert got[step][key] == expected[step][key], (step, key)
    val = [
        {
            r["step"]: r["val_loss"]
            for r in read_log(w / "finetune" / "log.jsonl")
            if r["kind"] == "val"
        }
        for w in runs.values()
    ]
    assert val[0] == val[1] and sorted(val[0]) == [0, 12, 24]
    a, b = (
        load_checkpoint(w / "finetune" / "checkpoints" / "ckpt-000024.pt")["model"]
        for w in runs.values()
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    answers = [
        json.loads((w / "finetune" / "test_responses.json").read_text())["responses"]
        for w in runs.values()
    ]
    assert answers[0] == answers[1]


# ---------------------------------------------------------------- the real 1,100 records


@pytest.mark.slow
def test_cli_finetune_on_the_instruction_set(pretrained: Path, tmp_path: Path) -> None:
    """`forge finetune` on the 1,100 records: 935 train / 55 val / 110 test, none dropped."""
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "workdir": str(tmp_path / "work"),
                "data": {"tokenize": {"vocab_dir": str(VOCAB)}},
                "finetune": {
                    "base": str(pretrained),
                    "data": [str(INSTRUCT)],
                    "max_steps": 4,
                    "lr": 1e-3,
                    "micro_batch_size": 4,
                    "eval_every": 0,
                    "eval_batches": 2,
                    "num_threads": 1,
                    "test_limit": 4,
                    "test_max_new_tokens": 8,
                },
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "finetune", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "ROUGE-L F1" in result.stdout and "dropped none" in result.stdout
    manifest = json.loads((tmp_path / "work" / "finetune" / "manifest.json").read_text())
    assert manifest["records"] == {"train": 935, "val": 55, "test": 110}
    assert manifest["test"]["records"] == 4
