import math

import pytest
import torch
import torch.nn.functional as F

from model.gpt import GPT, PRESETS, GPTConfig, KVCache, SoftcappedCrossEntropy
from model.gpt_config import ARCHITECTURES

VOCAB = 512  # vocabulary of the "lively" model used by the generation tests


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread is fastest and avoids stalls on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(preset: str = "tiny", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_preset(preset, **overrides)).eval()


@pytest.fixture(scope="module")
def tiny() -> GPT:
    return make("tiny")


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def lively(request: pytest.FixtureRequest) -> GPT:
    """Tiny model with large random weights: at GPT-2 init a tiny model repeats one token, which
    would hide cache bugs; with these weights greedy output depends on the whole context. One
    per recipe's architecture (the modern one: rotary positions in the cache)."""
    model = make("tiny", vocab_size=VOCAB, **ARCHITECTURES[request.param])
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


def prompt(n: int, batch: int = 1, vocab: int = 50257, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


def test_gpt2_param_count() -> None:
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 123_653_376


def test_presets_shapes() -> None:
    expected = {
        "gpt2": (12, 12, 768),
        "gpt2-medium": (24, 16, 1024),
        "gpt2-large": (36, 20, 1280),
        "gpt2-xl": (48, 25, 1600),
    }
    for name, (n_layer, n_head, n_embd) in expected.items():
        c = PRESETS[name]
        assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (
            n_layer,
            n_head,
            n_embd,
            1024,
            50257,
        )
        assert c.bias
    assert GPTConfig.from_preset("tiny", block_size=32).block_size == 32
    assert PRESETS["tiny"].block_size == 128  # overrides do not mutate the preset


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="gpt2-medium") as err:
        GPTConfig.from_preset("gpt5")
    assert "tiny" in str(err.value) and "gpt5" in str(err.value)


def test_module_names_follow_gpt2_layout(tiny: GPT) -> None:
    names = set(dict(tiny.named_parameters(remove_duplicate=False)))
    for n in [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.1.ln_2.bias",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.weight",
        "lm_head.weight",
    ]:
        assert n in names


def test_weight_tying(tiny: GPT) -> None:
    assert tiny.lm_head.weight is tiny.transformer.wte.weight


def test_init_std() -> None:
    model = make("small", vocab_size=1024)
    n_layer = model.config.n_layer
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
        elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias") and ".ln_" not in name:
            assert torch.all(p == 0), name


def test_initial_loss_near_uniform(tiny: GPT) -> None:
    idx = prompt(64, batch=4)
    targets = prompt(64, batch=4, seed=2)
    logits, loss = tiny(idx, targets)
    assert logits is None  # a loss needs no logits kept
    assert abs(loss.item() - math.log(50257)) < 0.3


def test_logits_for_all_positions_without_targets(tiny: GPT) -> None:
    idx = prompt(10, batch=2)
    logits, loss = tiny(idx)
    assert loss is None and logits.shape == (2, 10, 50257)
    last, _ = tiny(idx, last_only=True)
    torch.testing.assert_close(last, logits[:, -1:])


def test_ignore_index_excluded_from_loss(tiny: GPT) -> None:
    idx = prompt(16, batch=2)
    targets = prompt(16, batch=2, seed=3)
    targets[0, :10] = -100
    targets[1, 5:7] = -100
    loss = tiny(idx, targets)[1]
    logp = F.log_softmax(tiny(idx)[0], dim=-1)
    keep = targets != -100
    manual = -logp[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    torch.testing.assert_close(loss, manual)
    # and the masked positions really do not matter
    other = targets.clone()
    other[0, :10] = 7
    assert not torch.allclose(tiny(idx, other)[1], loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcapped_loss_on_the_cpu_equals_the_plain_expression(dtype: torch.dtype) -> None:
    """The chunked loss the CPU uses: same value and gradient as cross_entropy of the capped
    logits, masked targets left out, rows beyond one chunk and a ragged last chunk included."""
    torch.manual_seed(0)
    rows = 2 * SoftcappedCrossEntropy.CHUNK_ROWS + 5
    logits = (torch.randn(1, rows, 300) * 30).to(dtype)
    targets = torch.randint(0, 300, (1, rows))
    targets[0, :7] = -100
    plain = logits.detach().clone().requires_grad_()
    expected = F.cross_entropy(15 * torch.tanh(plain.float()[0] / 15), targets[0])
    (expected / 4).backward()  # a loss divided, as gradient accumulation does
    fused = logits.detach().clone().requires_grad_()
    loss = SoftcappedCrossEntropy.apply(fused, targets, 15.0)
    (loss / 4).backward()
    torch.testing.assert_close(loss, expected)
    assert fused.grad.dtype == dtype and fused.grad.shape == logits.shape
    torch.testing.assert_close(fused.grad, plain.grad)
    assert fused.grad[0, :7].abs().sum() == 0
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(SoftcappedCrossEntropy.apply(logits, targets, 15.0), expected)


def test_cached_logits_match_full_forward(lively: GPT) -> None:
    seq = prompt(40, batch=2, vocab=VOCAB)
    full, _ = lively(seq)
    cache = KVCache(lively.config.n_layer, 2, lively.config.block_size)

    def step(start: int, end: int) -> torch.Tensor:
        cache.span = end
        positions = torch.arange(start, end).expand(2, end - start)
        return lively(seq[:, start:end], cache=cache, positions=positions)[0]

    torch.testing.assert_close(step(0, 10), full[:, :10], atol=1e-5, rtol=0)  # prefill
    for t in range(10, 30):  # one token at a time
        torch.testing.assert_close(step(t, t + 1)[:, -1], full[:, t], atol=1e-5, rtol=0)
    # a multi-token chunk after a prefix
    torch.testing.assert_close(step(30, 40), full[:, 30:], atol=1e-5, rtol=0)


def test_cache_rows_advance_at_their_own_positions(lively: GPT) -> None:
    """Row 1 one token behind row 0 in one forward: each sees its own prefix only."""
    seq = prompt(12, batch=2, vocab=VOCAB)
    full, _ = lively(seq)
    cache = KVCache(lively.config.n_layer, 2, 16)
    cache.rows, cache.span = torch.tensor([0]), 10
    lively(seq[:1, :10], cache=cache, positions=torch.arange(10)[None])
    cache.rows, cache.span = torch.tensor([1]), 9
    lively(seq[1:, :9], cache=cache, positions=torch.arange(9)[None])
    cache.rows, cache.span = None, 11
    logits, _ = lively(torch.stack([seq[0, 10:11], seq[1, 9:10]]), cache=cache,
                       positions=torch.tensor([[10], [9]]))
    torch.testing.assert_close(logits[0, -1], full[0, 10], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1, -1], full[1, 9], atol=1e-5, rtol=0)


def test_cache_needs_positions_and_context_is_bounded(tiny: GPT) -> None:
    cache = KVCache(tiny.config.n_layer, 1, 8)
    with pytest.raises(ValueError, match="positions"):
        tiny(prompt(8), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        tiny(prompt(tiny.config.block_size + 1))


def test_configure_optimizer(tiny: GPT) -> None:
    opt = tiny.configure_optimizer(weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95), device_type="cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == tiny.num_params()
    assert opt.defaults["fused"]  # one fused kernel on the CPU too


def test_flops_and_mfu() -> None:
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2"))
    expected = 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024
    assert model.estimate_flops_per_token() == expected
    assert model.estimate_flops_per_token(seq_len=512) == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 512
    assert model.mfu(1000.0, expected * 2000.0) == pytest.approx(0.5)


def test_backward_and_dropout_train_mode() -> None:
    model = make("tiny", dropout=0.1, vocab_size=256).train()
    idx = prompt(32, batch=2, vocab=256)
    _, loss = model(idx, idx)
    loss.backward()
    assert model.transformer.wte.weight.grad is not None
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0


def test_mlp_uses_gpt2_tanh_gelu(tiny: GPT) -> None:
    mlp = tiny.transformer.h[0].mlp
    x = 40 * torch.randn(2, 3, tiny.config.n_embd)  # large enough that exact and tanh GELU differ
    h = mlp.c_fc(x)
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    torch.testing.assert_close(mlp(x), mlp.c_proj(gelu))


def test_modern_architecture() -> None:
    """The modern recipe's switches: rotary instead of learned positions, an untied head and
    zero-initialized output projections (so the first loss is exactly uniform), ReLU squared,
    RMSNorm, and logits soft-capped at 15."""
    model = make("tiny", vocab_size=VOCAB, **ARCHITECTURES["modern"])
    names = dict(model.named_parameters())
    assert "transformer.wpe.weight" not in names and "lm_head.weight" in names
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert isinstance(model.transformer.h[0].ln_1, torch.nn.RMSNorm)
    assert not any(n.endswith(".bias") for n in names)
    assert all(not p.any() for n, p in names.items() if n.endswith("c_proj.weight"))
    x = torch.randint(0, VOCAB, (2, 16))
    _, loss = model(x, x)
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=1e-6)
    h = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(model.transformer.h[0].mlp.act(h), torch.relu(h) ** 2)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 100.0)
    logits, _ = model(x)
    assert logits.abs().max() <= 15.0 and logits.abs().max() > 14.0
    assert model.num_params(non_embedding=True) == model.num_params() - VOCAB * 64


def test_rotary_attention_sees_relative_positions(lively: GPT) -> None:
    """With rotary positions, shifting every position by the same amount changes nothing;
    with learned ones it does."""
    seq = prompt(20, batch=2, vocab=VOCAB)
    base, _ = lively(seq, positions=torch.arange(20))
    shifted, _ = lively(seq, positions=torch.arange(20) + 7)
    if lively.config.rotary:
        torch.testing.assert_close(shifted, base, atol=1e-4, rtol=0)
    else:
        assert not torch.allclose(shifted, base, atol=1e-2)
