"""model/generate.py: batched generation with a KV cache, each row on its own."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB

from model.generate import Engine, Request, SamplingParams, sample
from model.gpt import GPT, GPTConfig
from pipeline.encoding import EOT_ID, VOCAB_SIZE, get_encoding

GREEDY = SamplingParams(temperature=0.0, frequency_penalty=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is fastest and avoids stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def enc():
    return get_encoding(str(VOCAB))


@pytest.fixture(scope="module")
def lively() -> GPT:
    """A tiny model with large random weights: greedy output depends on the whole context (at
    GPT-2 init a tiny model repeats one token, which would hide cache bugs)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=64)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def engine(lively: GPT, enc) -> Engine:
    return Engine(lively, enc, "cpu")


def prompts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in lengths]


def reference_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from full forwards without a cache: what the cached path must equal."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1, :VOCAB_SIZE].argmax()))
    return seq[len(prompt) :]


def test_a_batch_of_different_lengths_equals_each_row_alone(lively: GPT, engine: Engine) -> None:
    rows = prompts(3, 17, 9, 30)
    params = [GREEDY, SamplingParams(**{**vars(GREEDY), "max_tokens": 5}), GREEDY, GREEDY]
    batch = engine.generate([Request(p, q) for p, q in zip(rows, params, strict=True)])
    for prompt, q, got in zip(rows, params, batch, strict=True):
        alone = engine.generate([Request(prompt, q)])[0]
        assert got.tokens == alone.tokens
        assert got.prompt_tokens == len(prompt)
    # the cache is exact: the same tokens as full forwards, until the context ends (64)
    assert batch[0].tokens[:20] == reference_greedy(lively, rows[0], 20)
    assert batch[3].tokens == reference_greedy(lively, rows[3], 34)
    assert [c.finish_reason for c in batch] == ["length"] * 4
    assert [len(c.tokens) for c in batch] == [61, 5, 55, 34]  # max_tokens or the context's end


def test_seeded_rows_do_not_depend_on_the_other_rows(engine: Engine) -> None:
    p = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=7)
    rows = prompts(5, 11, 8)
    alone = engine.generate([Request(rows[1], p)])[0].tokens
    mixed = engine.generate([Request(rows[0], SamplingParams(max_tokens=3)), Request(rows[1], p),
                             Request(rows[2], SamplingParams(max_tokens=12, temperature=1.5))])
    assert mixed[1].tokens == alone
    other_seed = engine.generate([Request(rows[1], SamplingParams(**{**vars(p), "seed": 8}))])
    assert other_seed[0].tokens != alone


def test_end_of_text_and_stop_strings_end_a_row(engine: Engine, enc) -> None:
    prompt = prompts(6)[0]
    free = engine.generate([Request(prompt, GREEDY)])[0]
    # a stop string made of the 4th and 5th tokens' text: the text is cut before it
    stop = enc.decode(free.tokens[3:5])
    assert stop.strip(), "the test needs printable tokens"
    cut = engine.generate([Request(prompt, SamplingParams(**{**vars(GREEDY), "stop": (stop,)}))])
    assert cut[0].finish_reason == "stop"
    assert cut[0].text == enc.decode(free.tokens)[: enc.decode(free.tokens).find(stop)]
    assert cut[0].tokens == free.tokens[: len(cut[0].tokens)] and len(cut[0].tokens) <= 5


def test_end_of_text_token_stops_without_being_kept(enc) -> None:
    model = GPT(GPTConfig.from_preset("tiny", block_size=32)).eval()
    with torch.no_grad():  # every logit but <|endoftext|>'s is zero: greedy ends at once
        model.lm_head.weight.zero_()
        model.lm_head.weight[EOT_ID] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
    out = Engine(model, enc, "cpu").generate([Request([1, 2, 3], GREEDY)])[0]
    assert (out.tokens, out.text, out.finish_reason) == ([], "", "stop")


def test_on_token_false_cancels_only_that_row(engine: Engine) -> None:
    rows = prompts(4, 7)
    seen: dict[int, list[int]] = {0: [], 1: []}

    def on_token(row: int, token: int) -> bool:
        seen[row].append(token)
        return not (row == 0 and len(seen[0]) == 3)

    out = engine.generate([Request(p, GREEDY) for p in rows], on_token=on_token)
    assert out[0].finish_reason == "cancelled" and len(out[0].tokens) == 3
    assert out[1].finish_reason == "length" and out[1].tokens == seen[1]
    assert out[1].tokens == engine.generate([Request(rows[1], GREEDY)])[0].tokens


def test_frequency_penalty_breaks_repetition(engine: Engine) -> None:
    """The tiny model loops on a few tokens greedily; a penalty spreads its answer out."""
    prompt = prompts(5)[0]
    plain = engine.generate([Request(prompt, GREEDY)])[0].tokens
    penalized = engine.generate(
        [Request(prompt, SamplingParams(temperature=0.0, frequency_penalty=2.0))]
    )[0].tokens
    assert len(set(penalized)) > len(set(plain))


def test_bad_requests_are_refused_naming_the_field(engine: Engine) -> None:
    with pytest.raises(ValueError, match="request 1: the prompt is empty"):
        engine.generate([Request([1], GREEDY), Request([], GREEDY)])
    with pytest.raises(ValueError, match="request 0: the prompt has 64 tokens"):
        engine.generate([Request([1] * 64, GREEDY)])
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([Request([VOCAB_SIZE], GREEDY)])
    for field, value in [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", 0),
                         ("frequency_penalty", 3.0), ("stop", ("",))]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    assert engine.generate([]) == []


def test_sample_filters_top_k_and_top_p() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = [torch.Generator().manual_seed(0)]

    def draws(n: int, **kw) -> set[int]:
        p = [SamplingParams(temperature=1.0, **kw)]
        return {int(sample(logits, p, g)) for _ in range(n)}

    assert draws(200, top_k=2, top_p=1.0) == {0, 1}
    assert draws(200, top_p=0.7) == {0, 1}  # 0.5 alone falls short of 0.7; 0.5 + 0.3 reaches it
    assert draws(300, top_p=0.9) == {0, 1, 2}
    assert draws(400, top_p=1.0) == {0, 1, 2, 3}
    assert int(sample(logits, [SamplingParams(temperature=0.0)], g)) == 0


def test_padded_vocabulary_rows_are_never_sampled(enc) -> None:
    """vocab_size 50304 pads GPT-2's 50257 tokens: no padding id even where it wins."""
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50304, block_size=32)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[VOCAB_SIZE:] = 1.0  # the padding rows win every argmax
    engine = Engine(model, enc, "cpu")
    out = engine.generate([Request([0], GREEDY), Request([0], SamplingParams(max_tokens=20))])
    assert max(out[0].tokens + out[1].tokens) < VOCAB_SIZE


def test_top_k_1_and_tiny_top_p_sample_the_greedy_answer(engine: Engine) -> None:
    prompt = prompts(8)[0]
    greedy = engine.generate([Request(prompt, GREEDY)])[0].tokens
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        p = SamplingParams(temperature=1.0, frequency_penalty=0.0, seed=0, **kw)
        assert engine.generate([Request(prompt, p)])[0].tokens == greedy
