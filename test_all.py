"""The one test file: `pytest test_all.py`.

Sections, in the order of the repository: SeRA and LoRA, SiVA, Bone, VB-LoRA (formulas against plain
PyTorch references, float64 gradcheck, paper parameter counts, init, merge, save/load, bad input, apply),
the Triton kernels (forward and every gradient against the references, run on the CPU under
TRITON_INTERPRET=1), then smoke runs of train_gpt2.py and train_vit.py on tiny synthetic data.
"""
import os
# Kernel tests run on the CPU under Triton's interpreter (set before triton is imported), or compiled on a GPU
# with NANOPEFT_TEST_DEVICE=cuda (then TRITON_INTERPRET must stay unset).
KERNEL_DEVICE = os.environ.get("NANOPEFT_TEST_DEVICE", "cpu")
if KERNEL_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NANOPEFT_NO_TRITON", "1") # method tests use the reference path; kernel tests opt in
import sys, math, copy, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


# The one tolerance table, dtype -> (atol, rtol): atol is relative to the reference's largest entry, so one
# row fits tensors of any scale (Liger's table: fp32 1e-5, the 8-bit-mantissa types 2e-2).
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (2e-2, 2e-2)}


def assert_close(actual, expected, dtype=None):
    """actual vs an independent reference, at the tolerance of `dtype` (default: actual's dtype)."""
    atol, rtol = TOL[dtype or actual.dtype]
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    scale = max(expected.detach().abs().max().item(), 1e-12) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=atol * scale, rtol=rtol)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_device():
    """Tensors a kernel test creates land on KERNEL_DEVICE."""
    torch.set_default_device(KERNEL_DEVICE)
    yield KERNEL_DEVICE
    torch.set_default_device("cpu")


# ================================================================================================
# SeRA and LoRA
# ================================================================================================
from types import SimpleNamespace

import lora
import sera

# One row per method: the names differ, the contract is the same. `small` is a config for tiny layers
# whose in/out features are even (SeRA's split=2 must divide them).
_sera_lora_M = {
    "sera": SimpleNamespace(
        Config=sera.SeRAConfig, Linear=sera.SeRALinear, apply=sera.apply_sera, count=sera.sera_param_count,
        state_dict=sera.sera_state_dict, load=sera.load_sera_state_dict,
        trainable=("sera_A", "sera_C", "sera_B"), B="sera_B", small=dict(r=4, split=2, alpha=6.0)),
    "lora": SimpleNamespace(
        Config=lora.LoRAConfig, Linear=lora.LoRALinear, apply=lora.apply_lora, count=lora.lora_param_count,
        state_dict=lora.lora_state_dict, load=lora.load_lora_state_dict,
        trainable=("lora_A", "lora_B"), B="lora_B", small=dict(r=3, alpha=5.0, dropout=0.0)),
}
_sera_lora_names = pytest.mark.parametrize("name", ["sera", "lora"])


def _sera_lora_layer(name, d_in=12, d_out=10, dtype=torch.float32, randomize=True, **over):
    M = _sera_lora_M[name]
    cfg = M.Config(**{**M.small, **over})
    layer = M.Linear(nn.Linear(d_in, d_out, dtype=dtype), cfg)
    if randomize:  # B = 0 at init would hide every bug past A; give all adapter tensors O(1) values
        with torch.no_grad():
            for n in M.trainable:
                getattr(layer, n).uniform_(-1, 1)
    return layer, cfg


def _sera_lora_ref_delta(name, layer, cfg, x):
    """The adapter's output from the paper's dense formula, independent of the layer's code."""
    if name == "sera":
        A = torch.block_diag(*layer.sera_A.unbind(0))  # (in, r)
        B = torch.block_diag(*layer.sera_B.unbind(0))  # (r, out)
        return cfg.alpha / cfg.r * (x @ A @ layer.sera_C @ B)  # paper Eq. 1: x A C B
    return cfg.alpha / cfg.r * (x @ layer.lora_A.T) @ layer.lora_B.T


def _sera_lora_ref_dW(name, layer, cfg):
    """ΔW in the (out, in) layout, dense."""
    eye = torch.eye(layer.base.in_features, dtype=torch.float64)
    with torch.no_grad():
        lay = copy.deepcopy(layer).double()
        return _sera_lora_ref_delta(name, lay, cfg, eye).T  # rows of eye @ ΔW^T = ΔW^T


def _sera_lora_encoder(n_layers, width, device="meta"):
    """Transformer-shaped stack of Linears (HF-like names) for counting only."""
    L = lambda i, o: nn.Linear(i, o, device=device)
    return nn.ModuleList(nn.ModuleDict(dict(
        attn=nn.ModuleDict(dict(q_proj=L(width, width), k_proj=L(width, width), v_proj=L(width, width),
                                out_proj=L(width, width))),
        fc1=L(width, 4 * width), fc2=L(4 * width, width), ln=nn.LayerNorm(width, device=device)))
        for _ in range(n_layers))


def _sera_lora_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- forward, gradients

@_sera_lora_names
@pytest.mark.parametrize("shape", [(), (5,), (3, 7), (2, 3, 4)])
def test_sera_lora_shapes_and_reference(name, shape):
    layer, cfg = _sera_lora_layer(name)
    x = torch.randn(*shape, 12)
    y = layer(x)
    assert y.shape == (*shape, 10)
    ref = F.linear(x, layer.base.weight, layer.base.bias) + _sera_lora_ref_delta(name, layer, cfg, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@_sera_lora_names
def test_sera_lora_gradcheck_every_trainable(name):
    M = _sera_lora_M[name]
    layer, _ = _sera_lora_layer(name, d_in=6, d_out=4, dtype=torch.float64)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == set(M.trainable)
    params = tuple(getattr(layer, n).detach().clone().requires_grad_() for n in M.trainable)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    f = lambda x, *ps: torch.func.functional_call(layer, dict(zip(M.trainable, ps)), (x,))
    assert torch.autograd.gradcheck(f, (x, *params))
    layer(x).square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert all(getattr(layer, n).grad.abs().sum() > 0 for n in M.trainable)


@pytest.mark.parametrize("r, split", [(4, 4), (4, 2)])  # r/split = 1 (the default) and 2
def test_sera_function_matches_block_diag_reference(r, split):
    """SeRAFunction's forward and hand-written gradients vs autograd through the dense paper formula."""
    s, d_in, d_out, scale = split, 8, 12, 0.7
    kw = dict(dtype=torch.float64, requires_grad=True)
    y0, x = torch.randn(2, 3, d_out, **kw), torch.randn(2, 3, d_in, **kw)
    A, C = torch.randn(s, d_in // s, r // s, **kw), torch.randn(r, r, **kw)
    B = torch.randn(s, r // s, d_out // s, **kw)
    ins = (y0, x, A, C, B)
    g = torch.randn(3, 2, d_out, dtype=torch.float64).transpose(0, 1)  # a non-contiguous upstream gradient
    ref = y0 + scale * (x @ torch.block_diag(*A.unbind(0)) @ C @ torch.block_diag(*B.unbind(0)))
    ref_grads = torch.autograd.grad(ref, ins, g)
    out = sera.SeRAFunction.apply(y0.clone(), x, A, C, B, scale)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, ins, g), ref_grads):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda y, *t: sera.SeRAFunction.apply(y.clone(), *t, scale), ins)


@_sera_lora_names
def test_sera_lora_dropout_only_on_adapter_input(name):
    layer, cfg = _sera_lora_layer(name, dropout=0.5)
    x = torch.randn(4, 12)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = F.dropout(x, 0.5, training=True)
    ref = F.linear(x, layer.base.weight, layer.base.bias) + _sera_lora_ref_delta(name, layer, cfg, xd)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    layer.eval()
    ref = F.linear(x, layer.base.weight, layer.base.bias) + _sera_lora_ref_delta(name, layer, cfg, x)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@_sera_lora_names
def test_sera_lora_bf16_params_follow_base(name):
    layer, cfg = _sera_lora_layer(name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    lay32 = copy.deepcopy(layer).float()
    ref = F.linear(x.float(), lay32.base.weight, lay32.base.bias)
    ref = ref + _sera_lora_ref_delta(name, lay32, cfg, x.float())
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


@_sera_lora_names
def test_sera_lora_kernel_dispatch(name, monkeypatch):
    """On the Triton path the layer hands its tensors to the kernels API with the agreed signature."""
    M = _sera_lora_M[name]
    layer, cfg = _sera_lora_layer(name)
    seen = []

    def enabled(*ts):
        return True

    def sera_delta(x, A, C, B, scale):
        assert A is layer.sera_A and C is layer.sera_C and B is layer.sera_B and scale == cfg.alpha / cfg.r
        seen.append(x)
        return _sera_lora_ref_delta("sera", layer, cfg, x)

    def lowrank_add(y, x, A, B, d, scale):
        assert A is layer.lora_A and B is layer.lora_B and d is None and scale == cfg.alpha / cfg.r
        seen.append(x)
        return y + _sera_lora_ref_delta("lora", layer, cfg, x)

    def lowrank_linear(x, W, bias, A, B, d, scale, dropout=0.0):
        assert W is layer.base.weight and bias is layer.base.bias and dropout == 0.0  # `small`: no dropout
        return lowrank_add(F.linear(x, W, bias), x, A, B, d, scale)

    fake = SimpleNamespace(enabled=enabled, sera_delta=sera_delta, lowrank_add=lowrank_add,
                           lowrank_linear=lowrank_linear)
    monkeypatch.setattr(sera if name == "sera" else lora, "_kernels", fake)
    x = torch.randn(2, 3, 12)
    ref = F.linear(x, layer.base.weight, layer.base.bias) + _sera_lora_ref_delta(name, layer, cfg, x)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    assert len(seen) == 1 and torch.equal(seen[0].reshape(x.shape), x)  # no dropout in `small`: x reaches it
    layer.merge()
    layer(x)
    assert len(seen) == 1  # merged: base only, no kernel


# ---------------------------------------------------------------- init

@_sera_lora_names
def test_sera_lora_init_zero_start(name):
    M = _sera_lora_M[name]
    layer, _ = _sera_lora_layer(name, randomize=False)
    assert torch.count_nonzero(getattr(layer, M.B)) == 0
    x = torch.randn(2, 5, 12)
    assert torch.equal(layer(x), layer.base(x))
    assert torch.equal(layer.delta_weight(), torch.zeros(10, 12))


@_sera_lora_names
def test_sera_lora_init_kaiming_bounds(name):
    """kaiming_uniform_(a=sqrt(5)) is U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2))."""
    d_in, r = 2048, 32
    layer, _ = _sera_lora_layer(name, d_in=d_in, d_out=64, randomize=False, r=r)
    if name == "sera":  # split = 2: each A_i sees in/2 inputs, C sees r
        checks = [(layer.sera_A, d_in // 2), (layer.sera_C, r)]
    else:
        checks = [(layer.lora_A, d_in)]
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    for t, fan_in in checks:
        b = gain * math.sqrt(3 / fan_in)
        assert t.abs().max() <= b
        assert t.abs().max() > 0.95 * b  # 1000+ draws come near the edge; a wrong fan-in's bound is >= 1.4x off
        assert abs(t.mean().item()) < 0.1 * b
        assert abs(t.std().item() / (b / math.sqrt(3)) - 1) < 0.05


# ---------------------------------------------------------------- merge

@_sera_lora_names
def test_sera_lora_delta_weight_and_merge_roundtrip(name):
    layer, cfg = _sera_lora_layer(name)
    ref_dW = _sera_lora_ref_dW(name, layer, cfg)
    torch.testing.assert_close(layer.delta_weight().double(), ref_dW, rtol=1e-5, atol=1e-6)
    x = torch.randn(3, 4, 12)
    W0 = layer.base.weight.clone()
    y0 = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, W0 + layer.delta_weight())
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)  # merged: forward = base(x)
    W1 = layer.base.weight.clone()
    layer.merge()  # idempotent
    assert torch.equal(layer.base.weight, W1)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, W0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    layer.unmerge()  # idempotent
    torch.testing.assert_close(layer.base.weight, W0, rtol=0, atol=1e-6)


@_sera_lora_names
def test_sera_lora_merge_bf16_rounds_once(name):
    layer, _ = _sera_lora_layer(name, dtype=torch.bfloat16)
    W0 = layer.base.weight.clone()
    expect = (W0.float() + _sera_lora_ref_dW(name, layer, layer.cfg).float()).bfloat16()
    layer.merge()
    assert layer.base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer.base.weight.float(), expect.float(), rtol=0, atol=2e-2)


# ---------------------------------------------------------------- counts

@_sera_lora_names
@pytest.mark.parametrize("d_in,d_out,r,split",
                         [(12, 8, 4, 2), (64, 32, 8, 8), (768, 3072, 16, 4), (1024, 1024, 16, 16)])
def test_sera_lora_param_count_matches_layer(name, d_in, d_out, r, split):
    M = _sera_lora_M[name]
    cfg = sera.SeRAConfig(r=r, split=split) if name == "sera" else lora.LoRAConfig(r=r)
    closed = (d_in + d_out) * r / split + r * r if name == "sera" else r * (d_in + d_out)
    layer = M.Linear(nn.Linear(d_in, d_out, device="meta"), cfg)
    assert _sera_lora_trainable(layer) == M.count(d_in, d_out, cfg) == closed


def _sera_lora_clip_base():
    return nn.ModuleDict(dict(text=_sera_lora_encoder(12, 512), vision=_sera_lora_encoder(12, 768)))


@pytest.mark.parametrize("model_fn,r,expect", [
    (_sera_lora_clip_base, 8, 64_512),  # SeRA Table 1, "0.064M"
    (lambda: _sera_lora_encoder(24, 1024), 8, 101_376),  # SeRA Table 3, RoBERTa-large "0.1M"
    (lambda: _sera_lora_encoder(24, 1024), 16, 110_592),  # SeRA Table 3, "0.11M"
])
def test_sera_paper_counts(model_fn, r, expect):
    model = model_fn()
    names = sera.apply_sera(model, sera.SeRAConfig(r=r, split=r), ["q_proj", "v_proj"])
    assert len(names) == 48  # q and v of 24 layers
    assert _sera_lora_trainable(model) == expect


@pytest.mark.parametrize("model_fn,expect", [
    (_sera_lora_clip_base, 491_520),  # SeRA Table 1, LoRA on CLIP-base "0.492M"
    (lambda: _sera_lora_encoder(24, 1024), 786_432),  # LoRA / SeRA Table 3, RoBERTa-large "0.8M"
])
def test_lora_paper_counts(model_fn, expect):
    model = model_fn()
    lora.apply_lora(model, lora.LoRAConfig(r=8, alpha=16.0), ["q_proj", "v_proj"])
    assert _sera_lora_trainable(model) == expect


# ---------------------------------------------------------------- bad input

def test_sera_constraints_name_the_numbers():
    with pytest.raises(ValueError, match=r"split=3 must divide r=8"):
        sera.SeRAConfig(r=8, split=3)
    with pytest.raises(ValueError, match=r"r=0"):
        sera.SeRAConfig(r=0, split=1)
    with pytest.raises(ValueError, match=r"split=0"):
        sera.SeRAConfig(r=4, split=0)
    with pytest.raises(ValueError, match=r"dropout=1\.0"):
        sera.SeRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"split=4 must divide in_features=10"):
        sera.SeRALinear(nn.Linear(10, 8), sera.SeRAConfig(r=4, split=4))
    with pytest.raises(ValueError, match=r"split=4 must divide out_features=6"):
        sera.SeRALinear(nn.Linear(8, 6), sera.SeRAConfig(r=4, split=4))


def test_lora_constraints_name_the_numbers():
    with pytest.raises(ValueError, match=r"r=0"):
        lora.LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"dropout=-0\.1"):
        lora.LoRAConfig(dropout=-0.1)


# ---------------------------------------------------------------- apply, save / load

def _sera_lora_toy():
    blk = lambda: nn.ModuleDict(dict(
        attn=nn.ModuleDict(dict(q_proj=nn.Linear(8, 8), v_proj=nn.Linear(8, 8), c_proj=nn.Linear(8, 8),
                                xq_proj=nn.Linear(8, 8))),
        mlp=nn.ModuleDict(dict(c_proj=nn.Linear(8, 8))), ln=nn.LayerNorm(8)))
    return nn.ModuleDict(dict(h=nn.ModuleList([blk(), blk()]), q_proj=nn.LayerNorm(8), head=nn.Linear(8, 2)))


@_sera_lora_names
def test_sera_lora_apply_targets_exactly(name):
    M = _sera_lora_M[name]
    model = _sera_lora_toy()
    names = M.apply(model, M.Config(**M.small), ["q_proj", "attn.c_proj"])
    expect = {f"h.{i}.attn.{m}" for i in range(2) for m in ("q_proj", "c_proj")}
    assert set(names) == expect and len(names) == 4
    adapted = {n for n, m in model.named_modules() if isinstance(m, M.Linear)}
    assert adapted == expect
    assert isinstance(model.h[0].mlp.c_proj, nn.Linear) and isinstance(model.h[1].attn.xq_proj, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{t}" for n in expect for t in M.trainable}
    with pytest.raises(ValueError, match="k_proj"):
        M.apply(_sera_lora_toy(), M.Config(**M.small), ["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="'ln'"):  # matches only LayerNorms
        M.apply(_sera_lora_toy(), M.Config(**M.small), ["ln"])


@_sera_lora_names
def test_sera_lora_state_dict_roundtrip(name, tmp_path):
    M = _sera_lora_M[name]
    cfg = M.Config(**M.small)
    base = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 10))
    m1 = copy.deepcopy(base)
    M.apply(m1, cfg, ["0", "2"])
    with torch.no_grad():
        for p in m1.parameters():
            if p.requires_grad:
                p.uniform_(-1, 1)
    sd = M.state_dict(m1)
    assert set(sd) == {f"{i}.{t}" for i in ("0", "2") for t in M.trainable}
    path = tmp_path / "adapter.pt"
    torch.save(sd, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    sd2 = torch.load(path, map_location="cpu", weights_only=True)
    m2 = copy.deepcopy(base)
    M.apply(m2, cfg, ["0", "2"])
    x = torch.randn(4, 12)
    assert not torch.allclose(m1(x), m2(x))
    M.load(m2, sd2)
    assert torch.equal(m1(x), m2(x))

    bad = dict(sd2)
    del bad[f"0.{M.B}"]
    with pytest.raises(ValueError, match=f"0.{M.B}"):
        M.load(m2, bad)
    with pytest.raises(ValueError, match="9.extra"):
        M.load(m2, {**sd2, "9.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        M.load(m2, {**sd2, f"0.{M.B}": torch.zeros(1)})
    m2[0].merge()
    with pytest.raises(ValueError, match="unmerge"):
        M.load(m2, sd2)


# ---------------------------------------------------------------- SeRA's analysis helper

def test_sera_subspace_similarity_by_hand():
    Q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64)).Q  # orthonormal input-space directions
    R1 = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q  # unrelated output-space directions
    R2 = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    # paper layout ΔW^T = U Σ R^T, so ours is ΔW = R Σ U^T with U the input-side vectors (by σ descending)
    dW1 = R1[:, :2] @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ Q[:, [0, 1]].T
    dW2 = R2[:, :3] @ torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)) @ Q[:, [1, 2, 3]].T
    phi = sera.subspace_similarity
    assert phi(dW1, dW2, 1, 1) == pytest.approx(0.0, abs=1e-12)  # Q0 ⟂ Q1
    assert phi(dW1, dW2, 2, 1) == pytest.approx(1.0)  # span(Q0, Q1) contains Q1
    assert phi(dW1, dW2, 2, 3) == pytest.approx(0.5)  # one shared direction out of min(2, 3)
    assert phi(dW1, dW2, 1, 3) == pytest.approx(0.0, abs=1e-12)
    dW3 = R2[:, :2] @ torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)) @ Q[:, [2, 3]].T
    assert phi(dW1, dW3, 2, 2) == pytest.approx(0.0, abs=1e-12)  # orthogonal subspaces
    theta = 0.3  # rank one, tilted by theta from Q0: φ(1, 1) = cos²θ
    dW4 = R2[:, :1] @ (math.cos(theta) * Q[:, 0] + math.sin(theta) * Q[:, 5])[None]
    assert phi(dW1, dW4, 1, 1) == pytest.approx(math.cos(theta) ** 2)
    W = torch.randn(6, 8)
    for i in range(1, 7):
        assert phi(W, 3 * W, i, i) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="i=7"):
        phi(W, W, 7, 1)
    with pytest.raises(ValueError, match="8 vs 5"):
        phi(W, torch.randn(6, 5), 1, 1)


# ================================================================================================
# SiVA
# ================================================================================================
import re
import types
import numpy as np
import siva


def _siva_ref_delta(W, k, s, select="bottom"):
    """ΔW from an independent float64 numpy SVD: the kept pairs in descending-σ order, scaled by s."""
    U, S, Vt = np.linalg.svd(W.detach().double().numpy(), full_matrices=False)  # (out, n), (n,), (n, in)
    keep = slice(0, k) if select == "top" else slice(len(S) - k, len(S))
    return torch.from_numpy(U[:, keep] @ np.diag(s.detach().double().numpy()) @ Vt[keep])  # (out, in)


def _siva_hand_k(W, perc):
    """The paper's rule as a plain loop: add the smallest σ² while the share stays within 1 - perc."""
    sig2 = sorted(float(x) ** 2 for x in np.linalg.svd(W.detach().double().numpy(), compute_uv=False))
    total, acc, k = sum(sig2), 0.0, 0
    for v in sig2:
        if acc + v > (1 - perc) * total:
            break
        acc, k = acc + v, k + 1
    return max(k, 1)


class _siva_Model(nn.Module):
    def __init__(self, d=32, h=48):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q, self.attn.v, self.attn.c_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(d, h), nn.Linear(h, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        a = self.attn.c_proj(self.attn.q(x) * torch.tanh(self.attn.v(x)))
        return self.head(a + self.mlp.c_proj(F.gelu(self.mlp.c_fc(a))))


def _siva_randomize_s(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("siva_s"):
                p.normal_()


@pytest.mark.parametrize("d_in,d_out", [(32, 32), (80, 48), (48, 80)])
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_siva_forward_matches_reference(d_in, d_out, lead):
    base = nn.Linear(d_in, d_out)
    layer = siva.SiVALinear(copy.deepcopy(base), siva.SiVAConfig(perc=0.9))
    assert layer.siva_U.shape == (d_out, layer.k) and layer.siva_V.shape == (layer.k, d_in)
    with torch.no_grad():
        layer.siva_s.normal_()
    x = torch.randn(*lead, d_in)
    y = layer(x)
    assert y.shape == (*lead, d_out)
    dW = _siva_ref_delta(base.weight, layer.k, layer.siva_s)
    torch.testing.assert_close(layer.delta_weight().double(), dW, atol=1e-5, rtol=1e-5)
    ref = base(x).double() + x.double() @ dW.T
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_siva_delta_weight_float64_and_projection():
    base = nn.Linear(80, 48).double()
    for select in ("bottom", "top"):
        layer = siva.SiVALinear(copy.deepcopy(base), siva.SiVAConfig(perc=0.9, select=select))
        with torch.no_grad():
            layer.siva_s.normal_()
        dW = _siva_ref_delta(base.weight, layer.k, layer.siva_s, select)
        torch.testing.assert_close(layer.delta_weight(), dW, atol=1e-10, rtol=1e-10)
        # U_k^T W V_k is diagonal with the selected singular values, whatever the SVD's signs
        sig = torch.linalg.svdvals(base.weight.detach())  # (48,) descending
        want = sig[: layer.k] if select == "top" else sig[-layer.k:]
        proj = layer.siva_U.T @ base.weight.detach() @ layer.siva_V.T  # (k, k)
        torch.testing.assert_close(proj, torch.diag(want), atol=1e-10, rtol=1e-10)


def test_siva_top_picks_largest_with_same_k():
    base = nn.Linear(48, 48)
    bot = siva.SiVALinear(copy.deepcopy(base), siva.SiVAConfig(perc=0.95))
    top = siva.SiVALinear(copy.deepcopy(base), siva.SiVAConfig(perc=0.95, select="top"))
    assert bot.k == top.k
    W = base.weight.detach()
    sig = torch.linalg.svdvals(W)  # (48,) descending
    gain = lambda l: torch.diagonal(l.siva_U.T @ W @ l.siva_V.T).abs()  # (k,) σ along the kept pairs
    torch.testing.assert_close(gain(top), sig[: top.k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gain(bot), sig[-bot.k:], atol=1e-5, rtol=1e-5)


def test_siva_gradcheck_s():
    layer = siva.SiVALinear(nn.Linear(12, 9).double(), siva.SiVAConfig(perc=0.8))
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    s = torch.randn(layer.k, dtype=torch.float64, requires_grad=True)
    f = lambda x, s: torch.func.functional_call(layer, {"siva_s": s}, (x,))
    assert torch.autograd.gradcheck(f, (x, s))


def test_siva_rank_hand_values():
    sigma = torch.tensor([50.0, 30.0, 10.0, 6.0, 4.0], dtype=torch.float64).sqrt()  # σ² sum to 100
    assert siva.siva_rank(sigma, 0.9) == 2  # 4 + 6 = 10 ≤ 10 (share equal to 1 - perc is inside)
    assert siva.siva_rank(sigma, 0.91) == 1  # 10 > 9
    assert siva.siva_rank(sigma, 0.89) == 2  # 10 ≤ 11 < 20
    assert siva.siva_rank(sigma, 0.8) == 3  # 4 + 6 + 10 = 20 ≤ 20
    assert siva.siva_rank(sigma, 0.99) == 1  # even 4 > 1: k is at least 1
    assert siva.siva_rank(sigma[[3, 0, 4, 2, 1]], 0.9) == 2  # order of the input does not matter
    assert siva.siva_rank(torch.ones(8), 0.5) == 4  # equal σ: half the variance is exactly 4 of them


@pytest.mark.parametrize("perc", [0.5, 0.8, 0.95, 0.997])
def test_siva_layer_k_matches_hand_loop(perc):
    W = torch.randn(48, 80) @ torch.diag(torch.linspace(0.1, 3.0, 80))  # (48, 80) spread spectrum
    base = nn.Linear(80, 48)
    with torch.no_grad():
        base.weight.copy_(W)
    assert siva.SiVALinear(base, siva.SiVAConfig(perc=perc)).k == _siva_hand_k(W, perc)


def test_siva_random_basis():
    base = nn.Linear(80, 48)
    cfg = siva.SiVAConfig(perc=0.8, basis="random", seed=3)
    a = siva.SiVALinear(copy.deepcopy(base), cfg)
    b = siva.SiVALinear(copy.deepcopy(base), cfg)
    assert a.k == siva.SiVALinear(copy.deepcopy(base), siva.SiVAConfig(perc=0.8)).k
    eye = torch.eye(a.k)
    torch.testing.assert_close(a.siva_U.T @ a.siva_U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.siva_V @ a.siva_V.T, eye, atol=1e-5, rtol=0)
    assert torch.equal(a.siva_U, b.siva_U) and torch.equal(a.siva_V, b.siva_V)  # reload rebuilds it
    c = siva.SiVALinear(copy.deepcopy(base), siva.SiVAConfig(perc=0.8, basis="random", seed=4))
    assert not torch.allclose(a.siva_U, c.siva_U)
    # not W's singular basis: U_k^T W V_k is far from diagonal
    proj = a.siva_U.T @ base.weight.detach() @ a.siva_V.T  # (k, k)
    assert (proj - torch.diag(torch.diagonal(proj))).abs().max() > 1e-2
    x = torch.randn(4, 80)
    assert torch.equal(a(x), base(x))


@pytest.mark.parametrize("select,basis", [("bottom", "svd"), ("top", "svd"), ("bottom", "random")])
def test_siva_output_equals_base_at_init(select, basis):
    base = nn.Linear(48, 80)
    layer = siva.SiVALinear(copy.deepcopy(base), siva.SiVAConfig(select=select, basis=basis))
    x = torch.randn(2, 5, 48)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0


def test_siva_merge_unmerge_round_trip():
    layer = siva.SiVALinear(nn.Linear(80, 48), siva.SiVAConfig(perc=0.8))
    with torch.no_grad():
        layer.siva_s.normal_()
    W0 = layer.base.weight.detach().clone()
    x = torch.randn(6, 80)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight.detach(), W0 + layer.delta_weight(), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.eval()
    assert layer.merged  # no auto-merge / unmerge on mode switches
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight.detach(), W0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-6, rtol=1e-6)


def test_siva_state_dict_save_load_round_trip():
    base_model = _siva_Model()
    cfg = siva.SiVAConfig(perc=0.9)
    model = copy.deepcopy(base_model)
    names = siva.apply_siva(model, cfg, ["q", "v"])
    _siva_randomize_s(model)
    sd = siva.siva_state_dict(model)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "siva.pt")
        torch.save(sd, path)
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert sorted(loaded) == sorted(n + ".siva_s" for n in names)
    for n in names:
        assert loaded[n + ".siva_s"].shape == (model.get_submodule(n).k,)
    fresh = copy.deepcopy(base_model)
    siva.apply_siva(fresh, cfg, ["q", "v"])
    siva.load_siva_state_dict(fresh, loaded)
    x = torch.randn(3, 32)
    torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=1e-6)
    for n in names:  # U, V may differ by sign flips; ΔW may not
        torch.testing.assert_close(fresh.get_submodule(n).delta_weight(), model.get_submodule(n).delta_weight(),
                                   atol=1e-6, rtol=1e-6)


def test_siva_saved_tensors_are_only_s():
    model = _siva_Model()
    siva.apply_siva(model, siva.SiVAConfig(), ["q", "mlp.c_proj"])
    sd = siva.siva_state_dict(model)
    assert sd and all(n.endswith(".siva_s") for n in sd)
    assert sum(t.numel() for t in sd.values()) == sum(m.k for m in model.modules() if isinstance(m, siva.SiVALinear))
    assert not any("siva_U" in n or "siva_V" in n for n in model.state_dict())  # buffers are non-persistent


def test_siva_mismatched_k_raises():
    base_model = _siva_Model()
    model = copy.deepcopy(base_model)
    siva.apply_siva(model, siva.SiVAConfig(perc=0.95), ["attn.q"])
    other = copy.deepcopy(base_model)
    siva.apply_siva(other, siva.SiVAConfig(perc=0.6), ["attn.q"])
    k_saved, k_other = model.attn.q.k, other.attn.q.k
    assert k_saved != k_other
    with pytest.raises(ValueError, match=rf"attn\.q.*k={k_saved}.*k={k_other}"):
        siva.load_siva_state_dict(other, siva.siva_state_dict(model))
    with pytest.raises(ValueError, match="missing"):
        siva.load_siva_state_dict(other, {})


def test_siva_param_counts():
    model = _siva_Model()
    names = siva.apply_siva(model, siva.SiVAConfig(perc=0.9), ["q", "v", "c_fc"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = [model.get_submodule(n) for n in names]
    formula = sum(siva.siva_param_count(l.base.in_features, l.base.out_features, l.cfg, l.k) for l in layers)
    assert trainable == formula == sum(l.k for l in layers)
    for l in layers:
        assert l.k == _siva_hand_k(l.base.weight, 0.9)
    with pytest.raises(ValueError, match="k=0"):
        siva.siva_param_count(32, 32, siva.SiVAConfig(), 0)


def test_siva_effective_rank():
    assert siva.effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-12)
    rank1 = torch.outer(torch.randn(9, dtype=torch.float64), torch.randn(5, dtype=torch.float64))  # (9, 5)
    assert siva.effective_rank(rank1) == pytest.approx(1.0, rel=1e-9)
    p = (0.75, 0.25)  # diag(3, 1): p = σ / Σσ
    want = math.exp(-sum(q * math.log(q) for q in p))
    assert siva.effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("perc", [0.0, 1.0, 1.5, -0.1])
def test_siva_bad_perc_raises(perc):
    with pytest.raises(ValueError, match=rf"perc={re.escape(str(perc))}"):
        siva.SiVAConfig(perc=perc)
    with pytest.raises(ValueError, match=rf"perc={re.escape(str(perc))}"):
        siva.siva_rank(torch.ones(4), perc)


def test_siva_bad_config_raises():
    with pytest.raises(ValueError, match="select"):
        siva.SiVAConfig(select="middle")
    with pytest.raises(ValueError, match="basis"):
        siva.SiVAConfig(basis="fourier")
    with pytest.raises(ValueError, match="svd_dtype"):
        siva.SiVAConfig(svd_dtype=torch.float16)
    with pytest.raises(ValueError, match="meta"):
        siva.SiVALinear(nn.Linear(8, 8, device="meta"), siva.SiVAConfig())


def test_siva_apply_targets_and_freezing():
    model = _siva_Model()
    names = siva.apply_siva(model, siva.SiVAConfig(), ["attn.c_proj", "q"])
    assert names == ["attn.q", "attn.c_proj"]
    assert isinstance(model.attn.c_proj, siva.SiVALinear) and isinstance(model.mlp.c_proj, nn.Linear)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"attn.q.siva_s", "attn.c_proj.siva_s"}
    model = _siva_Model()
    assert siva.apply_siva(model, siva.SiVAConfig(), ["c_proj"]) == ["attn.c_proj", "mlp.c_proj"]
    with pytest.raises(ValueError, match="'k_proj'"):
        siva.apply_siva(_siva_Model(), siva.SiVAConfig(), ["q", "k_proj"])
    with pytest.raises(ValueError, match="'proj'"):  # whole name components only: "proj" is not "c_proj"
        siva.apply_siva(_siva_Model(), siva.SiVAConfig(), ["proj"])


def test_siva_kernel_path_arguments(monkeypatch):
    """The kernel branch must call lowrank_linear(x, W, bias, A=siva_V, B=siva_U, d=siva_s, 1.0); a stand-in
    with the documented semantics catches a wrong order on a non-square layer."""
    fake = types.SimpleNamespace(
        enabled=lambda *t: True,
        lowrank_linear=lambda x, W, bias, A, B, d=None, scale=1.0:
            F.linear(x, W, bias) + scale * ((x @ A.T) * d) @ B.T)
    monkeypatch.setattr(siva, "_kernels", fake)
    base = nn.Linear(48, 80)
    layer = siva.SiVALinear(copy.deepcopy(base), siva.SiVAConfig(perc=0.8))
    with torch.no_grad():
        layer.siva_s.normal_()
    x = torch.randn(2, 3, 48)
    ref = base(x).double() + x.double() @ _siva_ref_delta(base.weight, layer.k, layer.siva_s).T
    torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)


# ================================================================================================
# Bone
# ================================================================================================
import bone

# every (grouping, variant) pair the config accepts
_BONE_KINDS = [("col", "bone"), ("row", "bone"), ("col", "unconstrained"), ("row", "unconstrained"),
               ("col", "hadamard")]


def _bone_ref_weight(W, B, b, grouping, variant):
    """Independent reference: W' built block by block with Python loops, straight from SPEC §5."""
    Wp = W.clone()
    for i in range(W.shape[0] // b):
        for j in range(W.shape[1] // b):
            Wij = W[i * b:(i + 1) * b, j * b:(j + 1) * b]
            Bg = B[i] if grouping == "col" else B[j]
            if variant == "bone":
                d = Wij @ Bg + Bg
            elif variant == "hadamard":
                d = Wij * Bg + Bg
            else:
                d = Bg
            Wp[i * b:(i + 1) * b, j * b:(j + 1) * b] = Wij + d
    return Wp


def _bone_layer(d_in=12, d_out=8, b=4, grouping="col", variant="bone", dtype=torch.float32, scale=0.3):
    layer = bone.BoneLinear(nn.Linear(d_in, d_out).to(dtype), bone.BoneConfig(b=b, grouping=grouping, variant=variant))
    with torch.no_grad():
        layer.bone_B.normal_(0, scale)
    return layer


@pytest.mark.parametrize("grouping", ["col", "row"])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_bone_shapes(grouping, lead):
    layer = _bone_layer(grouping=grouping)
    groups = 8 // 4 if grouping == "col" else 12 // 4
    assert layer.bone_B.shape == (groups, 4, 4)
    y = layer(torch.randn(*lead, 12))
    assert y.shape == (*lead, 8)
    assert layer.delta_weight().shape == (8, 12)


@pytest.mark.parametrize("grouping,variant", _BONE_KINDS)
def test_bone_forward_matches_block_loop_reference(grouping, variant):
    layer = _bone_layer(grouping=grouping, variant=variant, dtype=torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    Wp = _bone_ref_weight(layer.base.weight, layer.bone_B, 4, grouping, variant)
    torch.testing.assert_close(layer(x), x @ Wp.T + layer.base.bias)
    torch.testing.assert_close(layer.delta_weight(), Wp - layer.base.weight)


@pytest.mark.parametrize("grouping,variant", _BONE_KINDS)
def test_bone_gradcheck_B_and_x(grouping, variant):
    layer = _bone_layer(d_in=8, d_out=12, grouping=grouping, variant=variant, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    B = layer.bone_B.detach().clone().requires_grad_(True)
    f = lambda x, B: torch.func.functional_call(layer, {"bone_B": B}, (x,))
    assert torch.autograd.gradcheck(f, (x, B))


@pytest.mark.parametrize("variant", ["bone", "hadamard"])
def test_bone_col_function_gradcheck_all_inputs(variant):
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    B = (0.3 * torch.randn(3, 4, 4, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    f = lambda x, W, B, bias: bone.BoneColFunction.apply(x, W, B, bias, variant)
    assert torch.autograd.gradcheck(f, (x, W, B, bias))


@pytest.mark.parametrize("variant", ["bone", "hadamard"])
def test_bone_col_function_backward_matches_autograd_reference(variant):
    x = torch.randn(4, 2, 16, requires_grad=True)
    W = torch.randn(24, 16, requires_grad=True)
    B = (0.3 * torch.randn(6, 4, 4)).requires_grad_(True)
    bias = torch.randn(24, requires_grad=True)
    g = torch.randn(4, 2, 24)
    ours = torch.autograd.grad(bone.BoneColFunction.apply(x, W, B, bias, variant), (x, W, B, bias), g)
    ref_y = x @ _bone_ref_weight(W, B, 4, "col", variant).T + bias
    ref = torch.autograd.grad(ref_y, (x, W, B, bias), g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grouping,variant", _BONE_KINDS)
def test_bone_zero_init_equals_base(grouping, variant):
    base = nn.Linear(12, 8)
    layer = bone.BoneLinear(copy.deepcopy(base), bone.BoneConfig(b=4, grouping=grouping, variant=variant))
    assert torch.count_nonzero(layer.bone_B) == 0
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("grouping,variant", _BONE_KINDS)
def test_bone_merge_unmerge_round_trip(grouping, variant):
    layer = _bone_layer(d_in=16, d_out=8, grouping=grouping, variant=variant, dtype=torch.float64, scale=0.1)
    W0 = layer.base.weight.detach().clone()
    x = torch.randn(3, 16, dtype=torch.float64)
    y0 = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, _bone_ref_weight(W0, layer.bone_B, 4, grouping, variant))
    torch.testing.assert_close(layer(x), y0)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.delta_weight()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, W0, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer(x), y0)


@pytest.mark.parametrize("grouping", ["col", "row"])
def test_bone_unmerge_singular_block_raises(grouping):
    layer = _bone_layer(grouping=grouping)
    with torch.no_grad():
        layer.bone_B[1] = -torch.eye(4)   # I + B_1 = 0
    layer.merge()
    with pytest.raises(RuntimeError, match="singular"):
        layer.unmerge()


@pytest.mark.parametrize("grouping", ["col", "row"])
@pytest.mark.parametrize("b", [2, 4])
def test_bone_param_count(grouping, b):
    cfg = bone.BoneConfig(b=b, grouping=grouping)
    layer = bone.BoneLinear(nn.Linear(12, 8), cfg)
    n = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    formula = (8 if grouping == "col" else 12) * b
    assert n == bone.bone_param_count(12, 8, cfg) == formula


class _BoneLlamaLayer(nn.Module):
    def __init__(self):
        super().__init__()
        d, f = 4096, 11008
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self, name, nn.Linear(d, d, bias=False))
        self.gate_proj = nn.Linear(d, f, bias=False)   # weight (11008, 4096): out 11008, in 4096
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)


@pytest.mark.parametrize("grouping,b,expected", [
    ("col", 64, 87_031_808), ("row", 64, 72_876_032),
    ("col", 16, 21_757_952), ("col", 32, 43_515_904), ("col", 128, 174_063_616)])
def test_bone_paper_llama2_7b_counts(grouping, b, expected):
    if grouping == "col":
        assert expected == 87_031_808 * b // 64   # col count is linear in b
    with torch.device("meta"):
        model = nn.ModuleList(_BoneLlamaLayer() for _ in range(32))
    names = bone.apply_bone(model, bone.BoneConfig(b=b, grouping=grouping),
                            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert len(names) == 32 * 7
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


class _BoneToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "c_proj": nn.Linear(8, 8)})
        self.mlp = nn.ModuleDict({"fc": nn.Linear(8, 16), "c_proj": nn.Linear(16, 8)})
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.attn["c_proj"](self.attn["q_proj"](self.ln(x)))
        return self.head(self.mlp["c_proj"](F.gelu(self.mlp["fc"](x))))


def test_bone_apply_targets_and_freezing():
    model = _BoneToy()
    names = bone.apply_bone(model, bone.BoneConfig(b=4), ["q_proj", "mlp.c_proj"])
    assert sorted(names) == ["attn.q_proj", "mlp.c_proj"]
    assert isinstance(model.attn["q_proj"], bone.BoneLinear) and isinstance(model.mlp["c_proj"], bone.BoneLinear)
    assert isinstance(model.attn["c_proj"], nn.Linear) and isinstance(model.head, nn.Linear)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["attn.q_proj.bone_B", "mlp.c_proj.bone_B"]
    assert sorted(bone.bone_state_dict(model)) == trainable

    model2 = _BoneToy()
    assert sorted(bone.apply_bone(model2, bone.BoneConfig(b=4), ["c_proj"])) == ["attn.c_proj", "mlp.c_proj"]
    with pytest.raises(ValueError, match="nope"):
        bone.apply_bone(_BoneToy(), bone.BoneConfig(b=4), ["q_proj", "nope"])


def test_bone_save_load_round_trip():
    model = _BoneToy()
    fresh = copy.deepcopy(model)
    cfg = bone.BoneConfig(b=4, grouping="row")
    bone.apply_bone(model, cfg, ["q_proj", "c_proj"])
    bone.apply_bone(fresh, cfg, ["q_proj", "c_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "bone_B" in n:
                p.normal_(0, 0.2)
    x = torch.randn(3, 8)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bone.pt")
        torch.save(bone.bone_state_dict(model), path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    assert not torch.equal(fresh(x), model(x))
    bone.load_bone_state_dict(fresh, sd)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match="unexpected"):
        bone.load_bone_state_dict(fresh, {**sd, "head.bone_B": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        bone.load_bone_state_dict(fresh, {k: v[:1] for k, v in sd.items()})
    fresh.attn["q_proj"].merge()
    with pytest.raises(ValueError, match="merged"):
        bone.load_bone_state_dict(fresh, sd)


def test_bone_constraints_raise_with_numbers():
    with pytest.raises(ValueError, match="b=64 must divide in_features=100"):
        bone.BoneLinear(nn.Linear(100, 128), bone.BoneConfig(b=64))
    with pytest.raises(ValueError, match="b=64 must divide out_features=96"):
        bone.BoneLinear(nn.Linear(128, 96), bone.BoneConfig(b=64, grouping="row"))
    with pytest.raises(ValueError, match="b=4 must divide in_features=10"):
        bone.bone_param_count(10, 8, bone.BoneConfig(b=4))
    with pytest.raises(ValueError, match="grouping"):
        bone.BoneConfig(grouping="diag")
    with pytest.raises(ValueError, match="variant"):
        bone.BoneConfig(variant="kron")
    with pytest.raises(ValueError, match="hadamard"):
        bone.BoneConfig(grouping="row", variant="hadamard")
    with pytest.raises(ValueError, match="b=0"):
        bone.BoneConfig(b=0)


@pytest.mark.parametrize("variant", ["bone", "hadamard"])
def test_bone_col_saves_no_dense_weight_prime(variant):
    layer = _bone_layer(d_in=16, d_out=24, variant=variant)
    x = torch.randn(5, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    W = layer.base.weight
    assert any(t.data_ptr() == W.data_ptr() for t in saved)   # the hook sees what the Function keeps
    dense = [t for t in saved if t.numel() == W.numel() and t.data_ptr() != W.data_ptr()]
    assert dense == []
    y.sum().backward()
    assert layer.bone_B.grad is not None and x.grad is not None


class _BoneStubKernels:
    """Stands in for kernels.py with the documented API, to check how BoneLinear uses the Triton ops."""
    @staticmethod
    def enabled(*tensors):
        return True

    @staticmethod
    def bone_row(x, B):
        b = B.shape[-1]
        t = torch.stack([x[..., j * b:(j + 1) * b] @ B[j].T for j in range(B.shape[0])], -2)  # (..., in/b, b)
        return x + t.flatten(-2), t.sum(-2)

    @staticmethod
    def bone_col_linear(x, W, B, bias=None):
        return F.linear(x, _bone_ref_weight(W, B, B.shape[-1], "col", "bone"), bias)


@pytest.mark.parametrize("grouping", ["col", "row"])
def test_bone_kernel_call_sites(grouping, monkeypatch):
    layer = _bone_layer(grouping=grouping, dtype=torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    ref = x @ _bone_ref_weight(layer.base.weight, layer.bone_B, 4, grouping, "bone").T + layer.base.bias
    monkeypatch.setattr(bone, "_kernels", _BoneStubKernels)
    torch.testing.assert_close(layer(x), ref)


def test_bone_weight_guide_norms():
    model = _BoneToy()
    bone.apply_bone(model, bone.BoneConfig(b=4), ["q_proj"])
    layer = model.attn["q_proj"]
    with torch.no_grad():
        layer.bone_B.normal_(0, 0.2)
    W, B = layer.base.weight, layer.bone_B
    guide = _bone_ref_weight(W, B, 4, "col", "bone") - _bone_ref_weight(W, B, 4, "col", "unconstrained")
    tile = _bone_ref_weight(W, B, 4, "col", "unconstrained") - W
    r = bone.bone_weight_guide_norms(model)["attn.q_proj"]
    assert math.isclose(r["guide"], guide.norm().item(), rel_tol=1e-4)
    assert math.isclose(r["tile"], tile.norm().item(), rel_tol=1e-4)
    assert math.isclose(r["delta"], (guide + tile).norm().item(), rel_tol=1e-4)


def test_bone_row_function_gradcheck_all_inputs():
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    W = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    B = (0.3 * torch.randn(3, 4, 4, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bone.BoneRowFunction.apply, (x, W, B, bias))


@pytest.mark.parametrize("with_bias", [True, False])
def test_bone_row_function_matches_block_loop_reference(with_bias):
    x = torch.randn(4, 2, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(24, 16, dtype=torch.float64, requires_grad=True)
    B = (0.3 * torch.randn(4, 4, 4, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True) if with_bias else None
    g = torch.randn(4, 2, 24, dtype=torch.float64)
    ins = (x, W, B) + ((bias,) if with_bias else ())
    y = bone.BoneRowFunction.apply(x, W, B, bias)
    ref_y = x @ _bone_ref_weight(W, B, 4, "row", "bone").T + (bias if with_bias else 0)
    torch.testing.assert_close(y, ref_y)
    ours = torch.autograd.grad(y, ins, g)
    for a, r in zip(ours, torch.autograd.grad(ref_y, ins, g)):
        torch.testing.assert_close(a, r)
    assert ours[0].is_contiguous()   # dx flows into the previous layer; strided grads slow its backward


def test_bone_row_function_frozen_weight_saves_no_dense_tensor():
    layer = _bone_layer(d_in=16, d_out=24, grouping="row")
    x = torch.randn(5, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    W = layer.base.weight
    assert [t for t in saved if t.numel() == W.numel() and t.data_ptr() != W.data_ptr()] == []
    y.sum().backward()
    assert layer.bone_B.grad is not None and x.grad is not None and W.grad is None


@pytest.mark.parametrize("grouping", ["col", "row"])
def test_bone_cpu_autocast_bf16_backward(grouping):
    layer = _bone_layer(d_in=16, d_out=8, grouping=grouping)
    x = torch.randn(3, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.bone_B.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = torch.autograd.grad((x @ _bone_ref_weight(layer.base.weight, layer.bone_B, 4, grouping, "bone").T).sum(),
                              layer.bone_B)[0]
    torch.testing.assert_close(layer.bone_B.grad, ref, rtol=0.05, atol=0.05)


# ================================================================================================
# VB-LoRA
# ================================================================================================
import vblora
from vblora import (VBLoRABank, VBLoRAConfig, VBLoRALinear, apply_vblora, load_vblora_state_dict,
                    vblora_compose_reference, vblora_param_count, vblora_state_dict,
                    vblora_stored_param_count, vector_usage)

_VB_TARGETS = ["q", "k", "v", "c_proj", "c_fc"]


class _VBBlock(nn.Module):
    """GPT-2-like block with separate q, k, v and two c_proj (attn and mlp) to test name matching."""

    def __init__(self, d, f, **kw):
        super().__init__()
        self.attn = nn.Module()
        for n in ("q", "k", "v", "c_proj"):
            setattr(self.attn, n, nn.Linear(d, d, **kw))
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(d, f, **kw), nn.Linear(f, d, **kw)

    def forward(self, x):
        a = self.attn
        x = x + a.c_proj(a.q(x) * torch.sigmoid(a.k(x)) + a.v(x))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(x)))


class _VBModel(nn.Module):
    def __init__(self, d=16, f=32, n_layer=2, **kw):
        super().__init__()
        self.h = nn.ModuleList([_VBBlock(d, f, **kw) for _ in range(n_layer)])
        self.head = nn.Linear(d, 5, **kw)

    def forward(self, x):
        for blk in self.h:
            x = blk(x)
        return self.head(x)


def _vb_cfg(**kw):
    return VBLoRAConfig(**{"r": 2, "b": 8, "h": 6, "k": 2, **kw})


def _vb_loop_compose(logits, bank, k):
    """Independent reference: per sub-vector, sort the logits, softmax the top k, mix bank rows."""
    out = []
    for row in logits.tolist():
        order = sorted(range(len(row)), key=lambda i: -row[i])[:k]
        m = max(row[i] for i in order)
        e = [math.exp(row[i] - m) for i in order]
        w = [x / sum(e) for x in e]
        out.append(sum(wj * bank[i] for wj, i in zip(w, order)))
    return torch.stack(out)


def _vb_hand_AB(layer, bank):
    """A (r, in) and B (out, r) built sub-vector by sub-vector from the loop reference."""
    r, b, k, h = layer.r, layer.b, layer.k, bank.shape[0]
    A = torch.zeros(r, layer.in_features, dtype=bank.dtype)
    B = torch.zeros(layer.out_features, r, dtype=bank.dtype)
    la, lb = layer.vblora_logits_A.detach(), layer.vblora_logits_B.detach()
    for i in range(r):
        for j in range(layer.in_features // b):
            A[i, j * b:(j + 1) * b] = _vb_loop_compose(la[i, j].reshape(1, h), bank, k)[0]
        for j in range(layer.out_features // b):
            B[j * b:(j + 1) * b, i] = _vb_loop_compose(lb[j, i].reshape(1, h), bank, k)[0]
    return A, B


def _vb_spread(model, std=1.0):
    """Logits with clear top-k gaps (init N(0, 0.01) is near-tied) so selections are stable."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vblora_logits" in n:
                p.normal_(0, std)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_vblora_compose_matches_loop(k):
    logits, bank = torch.randn(7, 6), torch.randn(6, 5)
    torch.testing.assert_close(vblora_compose_reference(logits, bank, k), _vb_loop_compose(logits, bank, k))


@pytest.mark.parametrize("k", [2, 3])
def test_vblora_gradcheck_compose(k):
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, v: vblora_compose_reference(l, v, k), (logits, bank))


@pytest.mark.parametrize("k", [2, 3])
def test_vblora_gradcheck_layer(k):
    model = nn.Sequential(nn.Linear(8, 12, dtype=torch.float64))
    apply_vblora(model, VBLoRAConfig(r=2, b=4, h=5, k=k), ["0"])
    _vb_spread(model)
    names = ["vblora_bank.vectors", "0.vblora_logits_A", "0.vblora_logits_B"]
    params = dict(model.named_parameters())
    inputs = [torch.randn(3, 8, dtype=torch.float64, requires_grad=True)]
    inputs += [params[n].detach().clone().requires_grad_(True) for n in names]

    def f(x, *ps):
        model.vblora_bank.clear_cache()  # gradcheck perturbs inputs through .data, unseen by _version
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_vblora_layout_and_forward_vs_hand():
    model = _VBModel()
    bank = apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model)
    x = torch.randn(4, 32)
    for layer in (model.h[0].mlp.c_fc, model.h[1].mlp.c_proj, model.h[0].attn.q):
        A, B = _vb_hand_AB(layer, bank.vectors.detach())
        torch.testing.assert_close(layer.delta_weight(), B @ A)
        xi = x[:, :layer.in_features]
        torch.testing.assert_close(layer(xi), layer.base(xi) + xi @ (B @ A).T)


def test_vblora_shapes_2d_3d():
    model = _VBModel()
    apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model)
    layer = model.h[0].mlp.c_fc
    x3 = torch.randn(2, 3, 16)
    y3, y2 = layer(x3), layer(x3.reshape(6, 16))
    assert y3.shape == (2, 3, 32) and y2.shape == (6, 32)
    torch.testing.assert_close(y3.reshape(6, 32), y2)
    assert model(x3).shape == (2, 3, 5)
    assert layer.delta_weight().shape == (32, 16)


def test_vblora_init_small_but_nonzero():
    base = _VBModel()
    model = copy.deepcopy(base)
    apply_vblora(model, VBLoRAConfig(r=2, b=8, h=6, k=2), _VB_TARGETS)
    bank = model.vblora_bank.vectors
    assert bank.abs().max() <= 0.02 and bank.abs().max() > 0.015  # U(-0.02, 0.02)
    la = model.h[0].attn.q.vblora_logits_A
    assert 0.005 < la.std() < 0.02 and la.shape == (2, 2, 6)  # N(0, 0.01), (r, in/b, h)
    assert model.h[0].mlp.c_fc.vblora_logits_B.shape == (4, 2, 6)  # (out/b, r, h)
    x = torch.randn(4, 16)
    diff = (model(x) - base(x)).abs().max()
    # |ΔW_ij| <= r * 0.02^2, so the adapted output moves, but by far less than the output itself
    assert 1e-7 < diff < 1e-2 * base(x).abs().max()


def test_vblora_param_counts():
    cfg = _vb_cfg()
    model = _VBModel()
    apply_vblora(model, cfg, _VB_TARGETS)
    layers = [m for m in model.modules() if isinstance(m, VBLoRALinear)]
    assert len(layers) == 12
    for l in layers:
        numel = sum(p.numel() for p in l.parameters() if p.requires_grad)
        assert numel == vblora_param_count(l.in_features, l.out_features, cfg)
    assert vblora_param_count(16, 32, cfg) == 2 * 2 * 6 + 4 * 2 * 6  # r*(in/b)*h + (out/b)*r*h
    assert vblora_param_count(1024, 4096, VBLoRAConfig()) == 4 * 4 * 256 + 16 * 4 * 256
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # per block: four 16x16 (2+2 sub-vectors per rank) + 16->32 + 32->16 (2+4 each), r=2
    S = 2 * (4 * 2 * 4 + 2 * 2 * 6)
    assert trainable == 6 * 8 + S * 6
    assert vblora_stored_param_count(model) == 6 * 8 + S * 1 + S * 2 * 1 / 4
    assert vblora_stored_param_count(_vb_paper_model(2, 16, 32, ["attn.q"], _vb_cfg(k=3))) \
        == 6 * 8 + 2 * 8 * 2 + 2 * 8 * 3 / 4  # two layers, 8 sub-vectors each, k=3


def _vb_paper_model(n_layer, d, f, targets, cfg):
    model = _VBModel(d=d, f=f, n_layer=n_layer, device="meta")
    apply_vblora(model, cfg, targets)
    return model


@pytest.mark.parametrize("n_layer, d, h, stored", [
    (24, 1024, 256, 75_904),  # GPT-2 Medium, E2E (Table 2 "0.076M")
    (24, 1024, 90, 33_408),  # RoBERTa-large, all six modules (Table 1 "0.033M")
    (12, 768, 90, 26_928),  # RoBERTa-base, all six modules (Table 1 "0.027M")
])
def test_vblora_paper_counts(n_layer, d, h, stored):
    # paper: b=256, r=4, k=2 throughout (Sec. 4.1, Tables 7-8); q,k,v,o d x d, fc d->4d, proj 4d->d
    model = _vb_paper_model(n_layer, d, 4 * d, _VB_TARGETS, VBLoRAConfig(r=4, b=256, h=h, k=2))
    assert model.vblora_bank.vectors.device.type == "meta"
    assert vblora_stored_param_count(model) == stored
    S = n_layer * 4 * (4 * (d // 256) * 2 + 2 * (d // 256 + 4 * d // 256))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == h * 256 + S * h


def test_vblora_bank_shared_once():
    model = _VBModel()
    bank = apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    assert model.vblora_bank is bank
    assert sum(p is bank.vectors for p in model.parameters()) == 1
    assert [k for k in model.state_dict() if "vectors" in k] == ["vblora_bank.vectors"]
    layers = [m for m in model.modules() if isinstance(m, VBLoRALinear)]
    assert all(l.bank is bank for l in layers) and bank.layers == layers
    assert all("vectors" not in k for l in layers for k in l.state_dict())
    assert len(bank.adapted_names) == 12 and bank.adapted_names[0] == "h.0.attn.q"


def test_vblora_apply_targets_and_freeze():
    model = _VBModel()
    apply_vblora(model, _vb_cfg(), ["attn.c_proj", "c_fc"])
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, VBLoRALinear))
    assert adapted == ["h.0.attn.c_proj", "h.0.mlp.c_fc", "h.1.attn.c_proj", "h.1.mlp.c_fc"]
    assert isinstance(model.h[0].mlp.c_proj, nn.Linear) and isinstance(model.h[0].attn.q, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vblora_bank.vectors"} | {f"{a}.vblora_logits_{s}" for a in adapted for s in "AB"}
    with pytest.raises(ValueError, match="'attn.nope'.*h.0.attn.q"):
        apply_vblora(_VBModel(), _vb_cfg(), ["q", "attn.nope"])


def test_vblora_constraint_errors():
    with pytest.raises(ValueError, match=r"VB-LoRA: k=300 must be <= h=256"):
        VBLoRAConfig(k=300)
    for field in ("r", "k", "b", "h"):
        with pytest.raises(ValueError, match=rf"VB-LoRA: {field}=0 must be >= 1"):
            VBLoRAConfig(**{field: 0})
    cfg = _vb_cfg()
    bank = VBLoRABank(cfg)
    with pytest.raises(ValueError, match=r"b=8 must divide in_features=12"):
        VBLoRALinear(nn.Linear(12, 16), cfg, bank)
    with pytest.raises(ValueError, match=r"b=8 must divide out_features=20"):
        VBLoRALinear(nn.Linear(16, 20), cfg, bank)
    with pytest.raises(ValueError, match=r"do not match"):
        VBLoRALinear(nn.Linear(16, 16), _vb_cfg(h=7), bank)
    model = _VBModel(d=16, f=36)
    with pytest.raises(ValueError, match=r"b=8 must divide out_features=36"):
        apply_vblora(model, cfg, _VB_TARGETS)
    assert not hasattr(model, "vblora_bank") and isinstance(model.h[0].attn.q, nn.Linear)


def test_vblora_merge_unmerge_round_trip():
    model = _VBModel()
    apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model)
    x = torch.randn(3, 16)
    layers = [m for m in model.modules() if isinstance(m, VBLoRALinear)]
    w0 = [l.base.weight.clone() for l in layers]
    dw = [l.delta_weight().detach() for l in layers]
    y0 = model(x)
    for l in layers:
        l.merge()
        l.merge()  # a second merge must not add ΔW twice
    for l, w, d in zip(layers, w0, dw):
        assert l.merged
        torch.testing.assert_close(l.base.weight, w + d)
    torch.testing.assert_close(model(x), y0, atol=1e-5, rtol=1e-5)
    for l in layers:
        l.unmerge()
    for l, w in zip(layers, w0):
        assert not l.merged
        torch.testing.assert_close(l.base.weight, w, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), y0)


@pytest.mark.parametrize("compact", [True, False])
def test_vblora_save_load(compact):
    base = _VBModel()
    model = copy.deepcopy(base)
    apply_vblora(model, _vb_cfg(k=3), _VB_TARGETS)
    _vb_spread(model)
    with torch.no_grad():
        model.vblora_bank.vectors.normal_(0, 0.1)
    x = torch.randn(4, 16)
    sd = vblora_state_dict(model, compact=compact)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "adapter.pt")
        torch.save(sd, path)
        loaded = torch.load(path, weights_only=True)
    assert all("vblora" in k for k in loaded)
    idx_keys = [k for k in loaded if k.endswith("vblora_idx_A")]
    assert (len(idx_keys) == 12) == compact
    assert not any("logits" in k for k in loaded) if compact else len(loaded) == 1 + 24
    fresh = copy.deepcopy(base)
    torch.manual_seed(1)
    apply_vblora(fresh, _vb_cfg(k=3), _VB_TARGETS)
    assert not torch.allclose(fresh(x), model(x))
    load_vblora_state_dict(fresh, loaded)
    if compact:
        q = loaded["h.0.attn.q.vblora_idx_A"]
        assert q.dtype == torch.uint8 and q.shape == (2, 2, 3)
        assert loaded["h.0.attn.q.vblora_w_A"].shape == (2, 2, 2)  # k-1 weights
        for a, b in zip(model.modules(), fresh.modules()):
            if isinstance(a, VBLoRALinear):
                torch.testing.assert_close(b.delta_weight(), a.delta_weight(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(fresh(x), model(x))


def test_vblora_index_dtype_and_bad_load():
    model = nn.Sequential(nn.Linear(8, 8))
    apply_vblora(model, VBLoRAConfig(r=1, b=4, h=300, k=2), ["0"])
    sd = vblora_state_dict(model)
    assert sd["0.vblora_idx_A"].dtype == torch.uint16
    assert vblora_stored_param_count(model) == 300 * 4 + 4 + 4 * 2 * 2 / 4  # S=4, 2-byte indices
    other = nn.Sequential(nn.Linear(8, 8))
    apply_vblora(other, VBLoRAConfig(r=1, b=4, h=300, k=3), ["0"])
    with pytest.raises(ValueError, match="shape"):
        load_vblora_state_dict(other, sd)
    with pytest.raises(ValueError, match="missing"):
        load_vblora_state_dict(model, {"vblora_bank.vectors": sd["vblora_bank.vectors"]})


def test_vblora_vector_usage():
    model = _VBModel()
    apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model)
    counts = torch.zeros(6, dtype=torch.long)
    for n, p in model.named_parameters():
        if "vblora_logits" in n:
            for row in p.detach().reshape(-1, 6).tolist():
                for i in sorted(range(6), key=lambda i: -row[i])[:2]:
                    counts[i] += 1
    assert torch.equal(vector_usage(model), counts)
    weighted = vector_usage(model, weighted=True)
    assert math.isclose(weighted.sum().item(), counts.sum().item() / 2, rel_tol=1e-5)  # weights sum to 1


def _vb_counting(monkeypatch):
    calls = []
    ref = vblora.vblora_compose_reference

    def counted(logits, bank, k):
        calls.append(logits.shape[0])
        return ref(logits, bank, k)

    monkeypatch.setattr(vblora, "vblora_compose_reference", counted)
    return calls


def test_vblora_one_compose_per_forward_and_eval_cache(monkeypatch):
    calls = _vb_counting(monkeypatch)
    model = _VBModel()
    apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y1 = model(x)
        assert calls == [2 * (4 * 2 * 4 + 2 * 2 * 6)]  # every layer's sub-vectors in one call
        y2 = model(x)
        assert len(calls) == 1 and torch.equal(y1, y2)  # eval reuses the cache
    model(x).sum().backward()
    assert len(calls) == 2  # grad mode does not reuse a no-grad composition
    with torch.no_grad():
        model.h[1].mlp.c_fc.vblora_logits_B.add_(1.0)  # an in-place edit bumps _version
        model(x)
    assert len(calls) == 3


def test_vblora_grad_accumulation(monkeypatch):
    calls = _vb_counting(monkeypatch)
    model = _VBModel()
    apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model)
    x = torch.randn(3, 16)
    params = [p for p in model.parameters() if p.requires_grad]
    model(x).square().mean().backward()
    g1 = [p.grad.clone() for p in params]
    model.zero_grad()
    for _ in range(2):
        model(x).square().mean().backward()  # reusing the freed graph would raise here
    assert len(calls) == 3
    for p, g in zip(params, g1):
        torch.testing.assert_close(p.grad, 2 * g)


def test_vblora_step_changes_output(monkeypatch):
    calls = _vb_counting(monkeypatch)
    model = _VBModel()
    bank = apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model, std=0.1)
    x = torch.randn(3, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    with torch.no_grad():
        y0 = model(x)
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        y1 = model(x)
        bank._cache = None
        y1_fresh = model(x)
    assert len(calls) == 4
    assert not torch.allclose(y0, y1)
    assert torch.equal(y1, y1_fresh)
    model(x)  # leaves a grad-mode composition (a non-leaf tensor) in the cache
    torch.testing.assert_close(copy.deepcopy(model)(x), model(x))


def test_vblora_kernel_dispatch(monkeypatch):
    # stand-in kernels module: checks the Triton path's calls and arguments, computes with references
    seen = []

    class _VBFakeKernels:
        @staticmethod
        def enabled(*ts):
            return True

        @staticmethod
        def vblora_compose(logits, bank, k):
            seen.append(("compose", tuple(logits.shape), bank is model.vblora_bank.vectors, k))
            return _vb_loop_compose(logits, bank, k)

        @staticmethod
        def lowrank_linear(x, W, bias, A, B, d, scale):
            seen.append(("lowrank", tuple(A.shape), tuple(B.shape), d, scale))
            return F.linear(x, W, bias) + (x @ A.T) @ B.T

    model = _VBModel()
    apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
        monkeypatch.setattr(vblora, "_kernels", _VBFakeKernels)
        model.vblora_bank.clear_cache()
        out = model(x)
    torch.testing.assert_close(out, ref)
    assert seen[0] == ("compose", (2 * (4 * 2 * 4 + 2 * 2 * 6), 6), True, 2)
    assert ("lowrank", (2, 16), (32, 2), None, 1.0) in seen and len(seen) == 1 + 12


def test_vblora_cache_survives_autocast_and_steps_that_skip_version():
    """A bf16-autocast forward must not leave bf16 A, B cached for an fp32 forward, and an optimizer step
    that writes through .data (as fused AdamW does, without bumping _version) must still recompose."""
    net = nn.Sequential(nn.Linear(32, 32))
    vblora.apply_vblora(net, vblora.VBLoRAConfig(r=2, b=16, h=8, k=2), ["0"])
    x = torch.randn(3, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    with torch.no_grad():
        y = net(x)  # would raise a dtype mismatch (or silently use bf16 A, B) with a stale bf16 cache
    assert y.dtype == torch.float32 and net[0].delta_weight().dtype == torch.float32

    class DataWriter(torch.optim.Optimizer):  # stands in for fused AdamW: no _version bump
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(0.5)

    opt = DataWriter([p for p in net.parameters() if p.requires_grad], {})
    with torch.no_grad():
        before = net(x)
        opt.step()
        after = net(x)
    assert not torch.allclose(before, after)
    net.vblora_bank.clear_cache()
    with torch.no_grad():
        torch.testing.assert_close(after, net(x))


def test_vblora_and_siva_targets_as_string_and_empty():
    net = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    bank = vblora.apply_vblora(net, vblora.VBLoRAConfig(r=2, b=16, h=8), "0")
    assert bank.adapted_names == ["0"]
    with pytest.raises(ValueError, match="empty"):
        vblora.apply_vblora(nn.Sequential(nn.Linear(32, 32)), vblora.VBLoRAConfig(r=2, b=16, h=8), [])
    import siva
    net = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    assert siva.apply_siva(net, siva.SiVAConfig(), "1") == ["1"]


# ================================================================================================
# Triton kernels: the low-rank path and SeRA (interpreted on CPU)
# ================================================================================================
import kernels as KA

# Triton's low-rank path and SeRA kernels vs plain PyTorch: forward and every gradient, odd sizes that cross
# tile borders (the interpreter tiles are 32 wide), 3-D inputs, in-place semantics, the enabled() switch.
# References run in float64 on the same (rounded) inputs; errors are relative to the reference's largest entry.

_KA_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
_KA_DTYPES = list(_KA_TOL)


@pytest.fixture
def _ka_triton(monkeypatch, kernel_device):
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "0")


def _ka_close(actual, expected, dtype):
    tol = _KA_TOL[dtype]
    scale = max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale)


def _ka_run(fn, inputs, g):
    """fn(*inputs) and the .grad of every input that requires grad (None elsewhere)."""
    needs = [t is not None and t.requires_grad for t in inputs]  # before fn: an in-place write gives y history
    for t in inputs:
        if t is not None:
            t.grad = None
    out = fn(*inputs)
    out.backward(g)
    return out, [t.grad if need else None for t, need in zip(inputs, needs)]


def _ka_f64(inputs):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]


def _ka_check(fn, ref, inputs, g, dtype):
    ref_inputs = _ka_f64(inputs)  # copied first: lowrank_add may write into y
    out, grads = _ka_run(fn, inputs, g)
    out_r, grads_r = _ka_run(ref, ref_inputs, g.double())
    assert out.dtype == dtype and out.shape == out_r.shape
    _ka_close(out, out_r, dtype)
    for t, gr, gr_r in zip(inputs, grads, grads_r):
        if t is not None and t.requires_grad:
            assert gr is not None and gr.dtype == t.dtype and gr.shape == t.shape
            _ka_close(gr, gr_r, dtype)


def _ka_lowrank_inputs(lead, d_in, d_out, r, with_d, dtype):
    mk = lambda *s: torch.randn(*s).to(dtype).requires_grad_()
    return [mk(*lead, d_out), mk(*lead, d_in), mk(r, d_in), mk(d_out, r), mk(r) if with_d else None]


# (leading shape, in, out, r, with d)
_KA_LOWRANK_SHAPES = [((1,), 32, 48, 1, False), ((9,), 80, 48, 4, True), ((41,), 48, 80, 8, True),
                      ((9,), 32, 32, 16, False), ((5,), 64, 48, 33, True)]


@pytest.mark.parametrize("dtype", _KA_DTYPES)
@pytest.mark.parametrize("lead,d_in,d_out,r,with_d", _KA_LOWRANK_SHAPES)
def test_ka_lowrank_add_fwd_bwd(_ka_triton, lead, d_in, d_out, r, with_d, dtype):
    y, x, A, B, d = _ka_lowrank_inputs(lead, d_in, d_out, r, with_d, dtype)
    # y is a leaf here, so lowrank_add adds into a copy; its gradient must still be g itself
    fn = lambda y, x, A, B, d: KA.lowrank_add(y, x, A, B, d, 0.7)
    ref = lambda y, x, A, B, d: KA.lowrank_add_reference(y, x, A, B, d, 0.7)
    _ka_check(fn, ref, [y, x, A, B, d], torch.randn(*lead, d_out).to(dtype), dtype)


def test_ka_lowrank_add_341_rows_and_3d(_ka_triton):
    for lead in [(341,), (3, 7)]:
        inputs = _ka_lowrank_inputs(lead, 80, 48, 16, True, torch.float32)
        fn = lambda y, x, A, B, d: KA.lowrank_add(y, x, A, B, d, 2.0)
        ref = lambda y, x, A, B, d: KA.lowrank_add_reference(y, x, A, B, d, 2.0)
        _ka_check(fn, ref, inputs, torch.randn(*lead, 48), torch.float32)


def test_ka_lowrank_add_grads_only_where_needed(_ka_triton):
    y, x, A, B, d = _ka_lowrank_inputs((9,), 48, 32, 4, True, torch.float32)
    x.requires_grad_(False), y.requires_grad_(False), B.requires_grad_(False)
    g, ref_inputs = torch.randn(9, 32), _ka_f64([y, x, A, B, d])
    out, grads = _ka_run(lambda y, x, A, B, d: KA.lowrank_add(y, x, A, B, d, 0.5), [y, x, A, B, d], g)
    out_r, grads_r = _ka_run(lambda y, x, A, B, d: KA.lowrank_add_reference(y, x, A, B, d, 0.5), ref_inputs,
                             g.double())
    assert out is y  # y needs no grad and is not a leaf that requires one: written in place
    _ka_close(out.detach(), out_r, torch.float32)
    assert grads[0] is None and grads[1] is None and grads[3] is None
    _ka_close(grads[2], grads_r[2], torch.float32)
    _ka_close(grads[4], grads_r[4], torch.float32)


def test_ka_lowrank_add_in_place(_ka_triton):
    x, A, B = torch.randn(2, 9, 48, requires_grad=True), torch.randn(4, 48), torch.randn(32, 4, requires_grad=True)
    base = torch.randn(2, 9, 32, requires_grad=True)
    y = base * 1.0  # a fresh non-leaf output, as a base layer returns
    expected = KA.lowrank_add_reference(y.detach().double(), x.detach().double(), A.double(), B.detach().double(),
                                        None, 0.5)
    ptr = y.data_ptr()
    out = KA.lowrank_add(y, x, A, B, None, 0.5)
    assert out is y and out.data_ptr() == ptr  # written in place
    _ka_close(y.detach(), expected, torch.float32)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(base.grad, g)  # d out / d y = identity, through the in-place write
    # non-contiguous y: a copy is written, the caller's y stays as it was
    yt, x2 = torch.randn(32, 5).t(), torch.randn(5, 48)
    before = yt.clone()
    out = KA.lowrank_add(yt, x2, A, B.detach(), None, 1.0)
    assert out.data_ptr() != yt.data_ptr() and torch.equal(yt, before)
    _ka_close(out, KA.lowrank_add_reference(*_ka_f64([before, x2, A, B]), None, 1.0), torch.float32)


def test_ka_lowrank_add_deterministic_and_mixed_dtypes(_ka_triton):
    # bf16 activations with fp32 adapter weights, the pattern under autocast; grads keep each input's dtype
    x, y = torch.randn(41, 80).bfloat16().requires_grad_(), torch.randn(41, 48).bfloat16()
    A, B, d = torch.randn(8, 80, requires_grad=True), torch.randn(48, 8, requires_grad=True), \
        torch.randn(8, requires_grad=True)
    g = torch.randn(41, 48).bfloat16()
    runs = [_ka_run(lambda y, x, A, B, d: KA.lowrank_add(y.clone(), x, A, B, d, 0.5), [y, x, A, B, d], g)
            for _ in range(2)]
    for a, b in zip(runs[0][1][1:], runs[1][1][1:]):
        assert torch.equal(a, b)  # no atomics: bit-identical gradients run to run
    out, grads = runs[0]
    out_r, grads_r = _ka_run(lambda y, x, A, B, d: KA.lowrank_add_reference(y, x, A, B, d, 0.5),
                             _ka_f64([y, x, A, B, d]), g.double())
    assert out.dtype == torch.bfloat16 and grads[2].dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    for a, b in zip([out] + grads[1:], [out_r] + grads_r[1:]):
        _ka_close(a, b, torch.bfloat16)


def test_ka_lowrank_add_large_rank_and_bad_shapes(_ka_triton):
    y, x, A, B, d = _ka_lowrank_inputs((5,), 32, 16, KA._MAX_RANK + 2, True, torch.float32)
    ref = KA.lowrank_add_reference(*_ka_f64([y.detach(), x, A, B, d]), 1.0)  # first: y is written in place
    out = KA.lowrank_add(y.detach(), x, A, B, d, 1.0)  # above the register budget: PyTorch path, same maths
    _ka_close(out, ref, torch.float32)
    with pytest.raises(ValueError, match="lowrank_add"):
        KA.lowrank_add(torch.randn(5, 16), torch.randn(5, 32), torch.randn(4, 31), torch.randn(16, 4))
    with pytest.raises(ValueError, match="lowrank_add"):
        KA.lowrank_add(torch.randn(5, 16), torch.randn(5, 32), torch.randn(4, 32), torch.randn(16, 4), torch.randn(3))


@pytest.mark.parametrize("dtype", _KA_DTYPES)
@pytest.mark.parametrize("with_d,train_w", [(False, False), (True, True)])
def test_ka_lowrank_linear_fwd_bwd(_ka_triton, dtype, with_d, train_w):
    # the whole layer x W^T + bias + s ((x A^T) d) B^T, the low-rank dx added into cuBLAS's g W in place
    x, A, B, d = [t for t in _ka_lowrank_inputs((3, 7), 48, 40, 5, with_d, dtype)[1:]]
    W = torch.randn(40, 48).to(dtype).requires_grad_(train_w)
    bias = torch.randn(40).to(dtype).requires_grad_()
    ref = lambda x, W, bias, A, B, d: KA.lowrank_add_reference(x @ W.T + bias, x, A, B, d, 0.7)
    calls = []
    real = KA._lowrank_bwd
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KA, "_lowrank_bwd", lambda *a, **k: calls.append(k.get("dx") is not None) or real(*a, **k))
        _ka_check(lambda *t: KA.lowrank_linear(*t, 0.7), ref, [x, W, bias, A, B, d],
                  torch.randn(3, 7, 40).to(dtype), dtype)
    assert calls == [True]  # the Triton path ran, accumulating into the base gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ka_lowrank_linear_dropout_matches_masked_reference(_ka_triton, dtype):
    # LoRA's dropout drawn in-kernel: forward and every gradient equal the formula with x~ = m x / (1 - p),
    # m the mask dropout_mask() draws for the same seed (so the fwd, bwd and weight-grad kernels agree on it)
    p, lead, d_in, d_out = 0.3, (5, 9), 80, 40
    x, A, B = [t for t in _ka_lowrank_inputs(lead, d_in, d_out, 6, False, dtype)[1:4]]
    W, bias = torch.randn(d_out, d_in).to(dtype), torch.randn(d_out).to(dtype).requires_grad_()
    seed = torch.tensor([20261122])
    keep = KA.dropout_mask(seed, 45, d_in, p).reshape(*lead, d_in)
    assert 0.5 < keep.float().mean() < 0.9  # a real mask, neither all-keep nor all-drop
    ref = lambda x, W, bias, A, B: KA.lowrank_add_reference(x @ W.T + bias, x * keep / (1 - p), A, B, None, 0.5)
    fn = lambda x, W, bias, A, B: KA.lowrank_linear(x, W, bias, A, B, None, 0.5, dropout=p, seed=seed)
    _ka_check(fn, ref, [x, W, bias, A, B], torch.randn(*lead, d_out).to(dtype), dtype)


def test_ka_dropout_mask_statistics_and_seeds(kernel_device):
    s1, s2 = torch.tensor([1]), torch.tensor([2])
    m = KA.dropout_mask(s1, 200, 300, 0.3)
    assert m.dtype == torch.bool and m.shape == (200, 300)
    assert abs(m.float().mean().item() - 0.7) < 0.012  # 60,000 Bernoulli(0.7) draws: 6 sigma
    assert abs(m[:, :150].float().mean().item() - m[:, 150:].float().mean().item()) < 0.02  # no column bias
    assert torch.equal(m, KA.dropout_mask(s1, 200, 300, 0.3))  # a pure function of the seed
    assert (m != KA.dropout_mask(s2, 200, 300, 0.3)).float().mean() > 0.3  # another seed, another mask
    with pytest.raises(ValueError, match="dropout"):
        KA.lowrank_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2),
                          dropout=1.0)


def test_ka_lora_layer_dropout_in_kernels(_ka_triton):
    # train: fresh in-kernel masks per call, reproducible from torch's seed; eval: no dropout at all
    layer = lora.LoRALinear(nn.Linear(48, 40), lora.LoRAConfig(r=4, alpha=8, dropout=0.5))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 48)
    torch.manual_seed(3)
    y1, y2 = layer(x), layer(x)
    torch.manual_seed(3)
    assert not torch.allclose(y1, y2) and torch.equal(layer(x), y1)
    layer.eval()
    full = layer.base(x) + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), full, rtol=1e-5, atol=1e-5)


def _ka_sera_inputs(lead, d_in, d_out, r, split, dtype):
    mk = lambda *s: torch.randn(*s).to(dtype).requires_grad_()
    return [mk(*lead, d_in), mk(split, d_in // split, r // split), mk(r, r), mk(split, r // split, d_out // split)]


def test_ka_sera_reference_is_dense_blockdiag():
    x, A, C, B = _ka_f64(_ka_sera_inputs((7,), 48, 32, 8, 4, torch.float32))
    dense = 0.3 * x @ torch.block_diag(*A) @ C @ torch.block_diag(*B)  # the paper's x A C B, literally
    torch.testing.assert_close(KA.sera_delta_reference(x, A, C, B, 0.3), dense)


# (leading shape, in, out, r, split)
_KA_SERA_SHAPES = [((1,), 32, 48, 8, 8), ((9,), 80, 48, 16, 4), ((41,), 48, 80, 4, 2), ((9,), 32, 32, 8, 1),
                   ((5,), 64, 96, 32, 16)]


@pytest.mark.parametrize("dtype", _KA_DTYPES)
@pytest.mark.parametrize("lead,d_in,d_out,r,split", _KA_SERA_SHAPES)
def test_ka_sera_delta_fwd_bwd(_ka_triton, lead, d_in, d_out, r, split, dtype):
    inputs = _ka_sera_inputs(lead, d_in, d_out, r, split, dtype)
    _ka_check(lambda *t: KA.sera_delta(*t, 0.5), lambda *t: KA.sera_delta_reference(*t, 0.5), inputs,
              torch.randn(*lead, d_out).to(dtype), dtype)


def test_ka_sera_delta_341_rows_3d_and_partial_grads(_ka_triton):
    for lead in [(341,), (3, 7)]:
        inputs = _ka_sera_inputs(lead, 80, 48, 8, 8, torch.float32)
        _ka_check(lambda *t: KA.sera_delta(*t, 2.0), lambda *t: KA.sera_delta_reference(*t, 2.0), inputs,
                  torch.randn(*lead, 48), torch.float32)
    x, A, C, B = _ka_sera_inputs((9,), 32, 48, 8, 4, torch.float32)
    x.requires_grad_(False), A.requires_grad_(False)
    _ka_check(lambda *t: KA.sera_delta(*t, 1.0), lambda *t: KA.sera_delta_reference(*t, 1.0), [x, A, C, B],
              torch.randn(9, 48), torch.float32)
    assert x.grad is None and A.grad is None


def test_ka_sera_delta_autocast_and_bad_shapes(_ka_triton):
    x, A, C, B = _ka_sera_inputs((9,), 32, 48, 8, 4, torch.float32)
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        out = KA.sera_delta(x, A, C, B, 1.0)
    assert out.dtype == torch.bfloat16  # the compute dtype follows autocast, like the reference's einsums
    _ka_close(out, KA.sera_delta_reference(*_ka_f64([x, A, C, B]), 1.0), torch.bfloat16)
    with pytest.raises(ValueError, match="sera_delta"):
        KA.sera_delta(torch.randn(9, 30), A, C, B, 1.0)
    with pytest.raises(ValueError, match="sera_delta"):
        KA.sera_delta(x, A, torch.randn(4, 4), B, 1.0)
    with pytest.raises(ValueError, match="sera_delta"):
        KA.sera_delta(x, A[0], C, B, 1.0)


def test_ka_enabled_truth_table(monkeypatch):
    cpu32, bf16, f16 = torch.randn(2), torch.randn(2).bfloat16(), torch.randn(2).half()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "1")
    assert not KA.enabled(cpu32)  # the kill switch wins
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "0")
    assert KA.enabled(cpu32, bf16, f16, None)
    assert not KA.enabled(cpu32, torch.randn(2).double())  # float64 is not a kernel dtype
    assert not KA.enabled(torch.arange(3))
    assert not KA.enabled(torch.empty(2, device="meta"))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not KA.enabled(cpu32)  # CPU tensors need the interpreter


# ================================================================================================
# Triton kernels: VB-LoRA compose, Bone row and col (interpreted on CPU)
# ================================================================================================
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as KB

# (atol, rtol) of a kernel result against an fp32 reference, both scaled by the reference's max magnitude
_KB_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-2, 2e-2)}
_KB_DTYPES = list(_KB_TOL)


def _kb_close(out, ref, dtype):
    atol, rtol = _KB_TOL[dtype]
    assert out.shape == ref.shape
    err = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= atol + rtol * scale, f"max err {err:.3g} vs scale {scale:.3g} ({dtype})"


def _kb_leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def _kb_grads(fn, inputs, grads_out):
    """Run fn(*inputs), backprop the given output gradients, return (outputs, input grads)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads_out)])
    return outs, [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


# ---- VB-LoRA compose

def _kb_vblora_logits(S, h):
    # distinct values per row (also in bf16/fp16), so every dtype's top-k picks the same entries
    return torch.stack([torch.randperm(h) for _ in range(S)]).float() * (3.0 / h)  # (S, h)


@pytest.mark.usefixtures("kernel_device")
def test_kb_vblora_reference_vs_row_loop():
    S, h, b, k = 7, 12, 5, 3
    logits, bank = torch.randn(S, h), torch.randn(h, b)
    out = torch.zeros(S, b, dtype=torch.float64)
    for s in range(S):
        order = sorted(range(h), key=lambda c: -logits[s, c].item())[:k]
        e = [math.exp(logits[s, c].item() - logits[s, order[0]].item()) for c in order]
        for c, ec in zip(order, e):
            out[s] += ec / sum(e) * bank[c].double()
    torch.testing.assert_close(KB.vblora_compose_reference(logits, bank, k).double(), out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("S,h,b,k", [(1, 16, 16, 1), (9, 40, 24, 2), (41, 16, 16, 3), (300, 16, 16, 3),
                                     (9, 16, 136, 2)])
@pytest.mark.parametrize("dtype", _KB_DTYPES)
@pytest.mark.usefixtures("kernel_device")
def test_kb_vblora_compose_fwd_bwd(S, h, b, k, dtype):
    logits, bank = _kb_vblora_logits(S, h), torch.rand(h, b) * 0.04 - 0.02
    g = torch.randn(S, b)
    ins = [_kb_leaf(logits, dtype), _kb_leaf(bank, dtype)]
    (out,), (dl, db) = _kb_grads(lambda a, c: KB.vblora_compose(a, c, k), ins, [g])
    rins = [_kb_leaf(logits), _kb_leaf(bank)]
    (ref,), (rl, rb) = _kb_grads(lambda a, c: KB.vblora_compose_reference(a, c, k), rins, [g])
    assert out.dtype == dtype and dl.dtype == dtype and db.dtype == dtype
    _kb_close(out, ref, dtype)
    _kb_close(dl, rl, dtype)
    _kb_close(db, rb, dtype)
    assert (dl != 0).sum(-1).le(k).all()  # only the selected logits get gradient


@pytest.mark.usefixtures("kernel_device")
def test_kb_vblora_bank_grad_is_deterministic_and_zero_for_unused_rows():
    S, h, b, k = 41, 40, 16, 2
    logits = _kb_leaf(_kb_vblora_logits(S, h))
    logits.data[:, :5] = -1.0  # bank rows 0..4 are never selected
    grads = []
    for _ in range(2):
        bank = _kb_leaf(torch.ones(h, b))
        KB.vblora_compose(logits, bank, k).pow(2).sum().backward()
        grads.append(bank.grad)
    assert torch.equal(grads[0], grads[1])
    assert (grads[0][:5] == 0).all() and (grads[0][5:].abs().sum(-1) > 0).any()


@pytest.mark.usefixtures("kernel_device")
def test_kb_vblora_compose_bad_input():
    with pytest.raises(ValueError, match="k=5"):
        KB.vblora_compose(torch.randn(3, 4), torch.randn(4, 8), 5)
    with pytest.raises(ValueError, match="bank"):
        KB.vblora_compose(torch.randn(3, 4), torch.randn(5, 8), 2)


# ---- Bone-row prologue

@pytest.mark.usefixtures("kernel_device")
def test_kb_bone_row_reference_vs_chunk_loop():
    x, B = torch.randn(3, 5, 12), torch.randn(3, 4, 4)
    y, ts = KB.bone_row_reference(x, B)
    t = [x[..., 4 * j:4 * (j + 1)] @ B[j].T for j in range(3)]  # (3, 5, 4) each
    torch.testing.assert_close(y, x + torch.cat(t, -1))
    torch.testing.assert_close(ts, t[0] + t[1] + t[2])


_KB_BONE_ROW_SHAPES = [((1,), 32, 16), ((9,), 96, 32), ((41,), 64, 16), ((2, 5), 72, 24)]


@pytest.mark.parametrize("lead,n_in,b", _KB_BONE_ROW_SHAPES)
@pytest.mark.parametrize("dtype", _KB_DTYPES)
@pytest.mark.usefixtures("kernel_device")
def test_kb_bone_row_fwd_bwd(lead, n_in, b, dtype):
    x, B = torch.randn(*lead, n_in), torch.randn(n_in // b, b, b) * 0.1
    gy, gs = torch.randn(*lead, n_in), torch.randn(*lead, b)
    (y, ts), (dx, dB) = _kb_grads(KB.bone_row, [_kb_leaf(x, dtype), _kb_leaf(B, dtype)], [gy, gs])
    (ry, rts), (rdx, rdB) = _kb_grads(KB.bone_row_reference, [_kb_leaf(x), _kb_leaf(B)], [gy, gs])
    assert y.dtype == ts.dtype == dx.dtype == dB.dtype == dtype
    for a, r in [(y, ry), (ts, rts), (dx, rdx), (dB, rdB)]:
        _kb_close(a, r, dtype)


@pytest.mark.parametrize("lead,n_in,b", [((41,), 64, 32), ((47,), 96, 48)])
@pytest.mark.usefixtures("kernel_device")
def test_kb_bone_row_small_tiles(monkeypatch, lead, n_in, b):
    # 16-wide tiles: several tiles per b-chunk; 2 row splits over 3 row blocks in the dB reduction
    monkeypatch.setattr(KB, "_BONE_BLOCK_M", 16)
    monkeypatch.setattr(KB, "_BONE_BLOCK", 16)
    monkeypatch.setattr(KB, "_BONE_TARGET_PROGRAMS", 2 * (n_in // b) * math.ceil(b / 16) ** 2)
    x, B = torch.randn(*lead, n_in), torch.randn(n_in // b, b, b) * 0.1
    gy, gs = torch.randn(*lead, n_in), torch.randn(*lead, b)
    outs, grads = _kb_grads(KB.bone_row, [_kb_leaf(x), _kb_leaf(B)], [gy, gs])
    routs, rgrads = _kb_grads(KB.bone_row_reference, [_kb_leaf(x), _kb_leaf(B)], [gy, gs])
    for a, r in zip(outs + tuple(grads), routs + tuple(rgrads)):
        _kb_close(a, r, torch.float32)


@pytest.mark.usefixtures("kernel_device")
def test_kb_bone_row_bad_input():
    with pytest.raises(ValueError, match="bone_row"):
        KB.bone_row(torch.randn(2, 30), torch.randn(2, 16, 16))


# ---- Bone-col linear

@pytest.mark.usefixtures("kernel_device")
def test_kb_bone_col_reference_vs_block_loop():
    n_out, n_in, b = 8, 12, 4
    x, W, B, bias = torch.randn(5, n_in), torch.randn(n_out, n_in), torch.randn(n_out // b, b, b), torch.randn(n_out)
    Wp = torch.empty(n_out, n_in)
    for i in range(n_out // b):
        for j in range(n_in // b):
            Wij = W[i * b:(i + 1) * b, j * b:(j + 1) * b]
            Wp[i * b:(i + 1) * b, j * b:(j + 1) * b] = Wij + Wij @ B[i] + B[i]
    torch.testing.assert_close(KB.bone_col_linear_reference(x, W, B, bias), x @ Wp.T + bias)


_KB_BONE_COL_SHAPES = [((1,), 32, 64, 16), ((9,), 96, 64, 32), ((41,), 64, 32, 16), ((2, 5), 48, 72, 24)]


@pytest.mark.parametrize("lead,n_in,n_out,b", _KB_BONE_COL_SHAPES)
@pytest.mark.parametrize("dtype", _KB_DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.usefixtures("kernel_device")
def test_kb_bone_col_fwd_bwd(lead, n_in, n_out, b, dtype, with_bias):
    x, W = torch.randn(*lead, n_in), torch.randn(n_out, n_in) / math.sqrt(n_in)
    B, bias = torch.randn(n_out // b, b, b) * 0.1, torch.randn(n_out)
    g = torch.randn(*lead, n_out)
    ins = [_kb_leaf(x, dtype), W.to(dtype), _kb_leaf(B, dtype)] + ([_kb_leaf(bias, dtype)] if with_bias else [])
    rins = [_kb_leaf(x), W, _kb_leaf(B)] + ([_kb_leaf(bias)] if with_bias else [])
    (y,), grads = _kb_grads(KB.bone_col_linear, ins, [g])
    (ry,), rgrads = _kb_grads(KB.bone_col_linear_reference, rins, [g])
    assert y.dtype == dtype and len(grads) == len(rgrads) == 2 + with_bias
    _kb_close(y, ry, dtype)
    for a, r in zip(grads, rgrads):
        assert a.dtype == dtype
        _kb_close(a, r, dtype)


@pytest.mark.parametrize("lead,n_in,n_out,b", [((41,), 96, 32, 32), ((21,), 96, 48, 48)])
@pytest.mark.usefixtures("kernel_device")
def test_kb_bone_col_small_tiles(monkeypatch, lead, n_in, n_out, b):
    # 16-wide tiles: W' tiles built from several r-tiles, several tiles per block; 2 j splits
    monkeypatch.setattr(KB, "_BONE_BLOCK_M", 16)
    monkeypatch.setattr(KB, "_BONE_BLOCK", 16)
    monkeypatch.setattr(KB, "_BONE_TARGET_PROGRAMS", 2 * (n_out // b) * math.ceil(b / 16) ** 2)
    x, W, B = torch.randn(*lead, n_in), torch.randn(n_out, n_in) / math.sqrt(n_in), torch.randn(n_out // b, b, b) * 0.1
    g = torch.randn(*lead, n_out)
    (y,), grads = _kb_grads(KB.bone_col_linear, [_kb_leaf(x), W, _kb_leaf(B)], [g])
    (ry,), rgrads = _kb_grads(KB.bone_col_linear_reference, [_kb_leaf(x), W, _kb_leaf(B)], [g])
    for a, r in zip([y] + grads, [ry] + rgrads):
        _kb_close(a, r, torch.float32)


@pytest.mark.usefixtures("kernel_device")
def test_kb_bone_col_saves_no_out_by_in_tensor():
    n_in, n_out, b = 64, 96, 32
    x, W, B = _kb_leaf(torch.randn(9, n_in)), torch.randn(n_out, n_in), _kb_leaf(torch.randn(n_out // b, b, b))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = KB.bone_col_linear(x, W, B)
    big = [t for t in saved if t.numel() >= n_out * n_in]
    assert saved and all(t.data_ptr() == W.data_ptr() for t in big)  # only the frozen W itself, no W'
    y.sum().backward()
    assert x.grad is not None and B.grad is not None


@pytest.mark.usefixtures("kernel_device")
def test_kb_bone_col_bad_input():
    W = torch.randn(64, 48)
    with pytest.raises(ValueError, match="b \\| in"):
        KB.bone_col_linear(torch.randn(2, 48), W, torch.randn(2, 32, 32))
    with pytest.raises(ValueError, match="in=48"):
        KB.bone_col_linear(torch.randn(2, 40), W, torch.randn(4, 16, 16))
    with pytest.raises(ValueError, match="frozen"):
        KB.bone_col_linear(torch.randn(2, 48), W.requires_grad_(True), torch.randn(4, 16, 16))


# ================================================================================================
# Method layers through the kernels, and the PyTorch fast paths
# ================================================================================================
import kernels
import lora, sera, siva, bone, vblora

# Every method layer, with kernels enabled, must run its forward AND backward through its Triton ops, and
# give what the plain PyTorch path gives. The launchers are spied on, so a silent fallback fails the test.
_IT_CASES = {
    "lora": (lambda m: lora.apply_lora(m, lora.LoRAConfig(r=4, dropout=0.0), ["fc1", "fc2"]),
             ["_lowrank_fwd", "_lowrank_bwd"]),
    "sera": (lambda m: sera.apply_sera(m, sera.SeRAConfig(r=8, split=4), ["fc1", "fc2"]),
             ["_sera_fwd", "_sera_bwd"]),
    "siva": (lambda m: siva.apply_siva(m, siva.SiVAConfig(perc=0.9), ["fc1", "fc2"]),
             ["_lowrank_fwd", "_lowrank_bwd"]),
    "bone-row": (lambda m: bone.apply_bone(m, bone.BoneConfig(b=16, grouping="row"), ["fc1", "fc2"]),
                 ["_bone_row_fwd", "_bone_row_bwd"]),
    "bone-col": (lambda m: bone.apply_bone(m, bone.BoneConfig(b=16, grouping="col"), ["fc1", "fc2"]),
                 ["_bone_col_wprime", "_bone_col_dB"]),
    "vblora": (lambda m: vblora.apply_vblora(m, vblora.VBLoRAConfig(r=4, b=16, h=12, k=2), ["fc1", "fc2"]),
               ["_vblora_compose_fwd", "_vblora_compose_bwd", "_lowrank_fwd", "_lowrank_bwd"]),
}


def _it_model():
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)).requires_grad_(False)


class _ItNet(nn.Module):
    def __init__(self, seq):
        super().__init__()
        self.fc1, self.act, self.fc2 = seq[0], seq[1], seq[2]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _it_run(method, monkeypatch, triton_on):
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "0" if triton_on else "1")
    torch.manual_seed(0)
    net = _ItNet(_it_model())
    _IT_CASES[method][0](net)
    with torch.no_grad():  # move every adapter off its zero start so every gradient is non-trivial
        for n, p in net.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = net(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("method", list(_IT_CASES))
def test_integration_layers_use_kernels_and_match_reference(method, monkeypatch, kernel_device):
    calls = {}
    for name in _IT_CASES[method][1]:
        real = getattr(kernels, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **kw)
        monkeypatch.setattr(kernels, name, spy)
    y_k, gx_k, g_k = _it_run(method, monkeypatch, True)
    assert set(calls) == set(_IT_CASES[method][1]), f"{method}: launchers called {calls}"
    calls.clear()
    y_r, gx_r, g_r = _it_run(method, monkeypatch, False)
    assert calls == {}, f"{method}: NANOPEFT_NO_TRITON=1 still launched {calls}"
    torch.testing.assert_close(y_k, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_k, gx_r, rtol=1e-5, atol=1e-5)
    assert g_k.keys() == g_r.keys() and len(g_k) > 0
    for n in g_k:
        torch.testing.assert_close(g_k[n], g_r[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{method} {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_integration_lowrank_torch_path_matches_reference(dtype, monkeypatch):
    """The PyTorch low-rank op (Triton off) against autograd through the plain formula, in float64."""
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "1")
    mk = lambda *s: torch.randn(*s).to(dtype).requires_grad_()
    y, x, A, B, d = mk(3, 7, 24), mk(3, 7, 40), mk(5, 40), mk(24, 5), mk(5)
    g = torch.randn(3, 7, 24)
    ref_in = [t.detach().double().requires_grad_() for t in (y, x, A, B, d)]
    ref = kernels.lowrank_add_reference(*ref_in, 0.5)
    ref.backward(g.double())
    out = kernels.lowrank_add(y * 1, x, A, B, d, 0.5)  # y * 1: a fresh non-leaf, written in place
    out.backward(g.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    for t, r in zip((y, x, A, B, d), ref_in):
        assert t.grad.dtype == dtype
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=tol, atol=tol * r.grad.abs().max().item())
    torch.autograd.gradcheck(lambda *a: kernels.lowrank_add(a[0] * 1, *a[1:], 0.5),
                             [t.detach().double().requires_grad_() for t in (y[:1, :2], x[:1, :2], A, B, d)])


@pytest.mark.parametrize("method", ["lora", "siva", "vblora"])
def test_integration_copied_file_without_kernels_matches(method, monkeypatch):
    """A method file copied without kernels.py (its _kernels is None) computes the same outputs and grads."""
    def run():
        torch.manual_seed(0)
        net = _ItNet(_it_model())
        _IT_CASES[method][0](net)
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(4, 32, requires_grad=True)
        net(x).square().sum().backward()
        return [x.grad] + [p.grad for p in net.parameters() if p.requires_grad]
    with_kernels = run()
    monkeypatch.setattr(sys.modules[method], "_kernels", None)
    without = run()
    for a, b in zip(with_kernels, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_d", [False, True])
def test_integration_lowrank_linear_torch_path_matches_reference(with_d, monkeypatch):
    """The fused base + low-rank PyTorch op: output and every gradient (x, W, bias, A, B, d) vs autograd
    through the plain formula, plus float64 gradcheck."""
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "1")
    mk = lambda *s: torch.randn(*s, dtype=torch.float64).requires_grad_()
    x, W, bias, A, B = mk(2, 5, 12), mk(9, 12), mk(9), mk(3, 12), mk(9, 3)
    d = mk(3) if with_d else None
    ins = [x, W, bias, A, B, d]
    ref = lambda x, W, bias, A, B, d: F.linear(x, W, bias) + 0.7 * (((x @ A.T) * (1 if d is None else d)) @ B.T)
    g = torch.randn(2, 5, 9, dtype=torch.float64)
    out = kernels.lowrank_linear(*ins, 0.7)
    grads = torch.autograd.grad(out, [t for t in ins if t is not None], g)
    ref_out = ref(*ins)
    ref_grads = torch.autograd.grad(ref_out, [t for t in ins if t is not None], g)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda *a: kernels.lowrank_linear(*a, 0.7), tuple(ins))


def test_integration_lowrank_linear_under_cpu_autocast(monkeypatch):
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "1")
    x = torch.randn(4, 16, requires_grad=True)
    W, bias = torch.randn(8, 16), torch.randn(8)
    A, B = torch.randn(2, 16, requires_grad=True), torch.randn(8, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = kernels.lowrank_linear(x, W, bias, A, B, None, 0.5)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == A.grad.dtype == B.grad.dtype == torch.float32
    ref = F.linear(x, W, bias) + 0.5 * (x @ A.T) @ B.T
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2 * ref.abs().max().item())


# ================================================================================================
# Every Triton kernel compiles for an H100 (sm_90), ahead of time, with its launchers' arguments
# ================================================================================================
# Ahead-of-time compilation of every Triton kernel for an H100 (sm_90), on this GPU-less machine.
# The interpreter (TRITON_INTERPRET=1, what the kernel tests run) accepts code the real compiler rejects;
# this test runs the real compiler down to a cubin with the argument types and constexprs the launchers
# pass on CUDA. It proves the kernels compile, not that they are right or fast on a GPU.
import inspect
import subprocess
import textwrap

import kernels


def _aot_compile_all(repo):
    """Run in a fresh interpreter without TRITON_INTERPRET: call the launchers with fake CUDA tensors of
    GPT-2-Medium shapes, record each kernel launch instead of running it, and compile every distinct
    launch (every config of an autotuned kernel) for sm_90 with Triton's own argument specialisation.
    Prints one line per compile (registers, stack, shared memory from the cubin); raises if any compile
    fails or if some kernel is reached by no launch below."""
    import os
    import subprocess
    import sys
    import tempfile
    import time
    import torch
    sys.path.insert(0, repo)
    import triton
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature
    import kernels as K

    assert not K._interpreting()
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    K._sm_count = lambda index: 132  # H100 SXM; the launchers' heuristics ask the (absent) device

    launched = {n: v for n, v in vars(K).items() if isinstance(v, (JITFunction, Autotuner)) and
                (n.endswith("_kernel") or isinstance(v, Autotuner))}
    records = []  # (kernel, args, kwargs, dtype set, label)

    class Recorder:  # stands in for a kernel: kernel[grid](*args, **kw) records the launch
        def __init__(self, kernel, label):
            self.kernel, self.label = kernel, label

        def __getitem__(self, grid):
            def launch(*args, **kw):
                args = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
                records.append((self.kernel, args, kw, *self.label))
            return launch

    def capture(label, fn, *args):
        for n, v in launched.items():
            setattr(K, n, Recorder(v, label))
        try:
            fn(*args)
        finally:  # helpers the kernels call (_bone_dot, ...) are looked up in K at compile time
            for n, v in launched.items():
                setattr(K, n, v)

    N, D, r, b_bone = 4096, 1024, 4, 64
    layers = ((D, D), (D, 4 * D), (4 * D, D))
    # (activations, adapter params, frozen weight, TF32 on): autocast bf16 over fp32 params with TF32 as
    # train_vit.py sets it (Bone's fp32 W x B products then run in TF32), a bf16 model, fp32 throughout
    dtype_sets = {"bf16/fp32": (torch.bfloat16, torch.float32, torch.float32, True),
                  "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
                  "fp32": (torch.float32, torch.float32, torch.float32, False)}
    for name, (act, par, wt, tf32) in dtype_sets.items():
        torch.backends.cuda.matmul.allow_tf32 = tf32
        dot, prec = K._dot_config(act)
        with FakeTensorMode():
            cuda = dict(device="cuda")
            for n_in, n_out in layers:
                x, g = torch.empty(N, n_in, dtype=act, **cuda), torch.empty(N, n_out, dtype=act, **cuda)
                A, B = torch.empty(r, n_in, dtype=par, **cuda), torch.empty(n_out, r, dtype=par, **cuda)
                d, h = torch.empty(r, dtype=par, **cuda), torch.empty(N, r, dtype=torch.float32, **cuda)
                for dd in (None, d):  # LoRA / VB-LoRA, SiVA
                    lab = (name, f"{n_in}->{n_out} d={dd is not None}")
                    capture(lab, K._lowrank_fwd, torch.empty_like(g), x, A, B, dd, 2.0, h, dot, prec)
                    capture(lab, K._lowrank_bwd, g, x, A, B, dd, h, 2.0, (True, True, True, dd is not None),
                            dot, prec)
                seed = torch.empty(1, dtype=torch.int64, **cuda)  # LoRA with dropout: masks drawn in-kernel
                lab = (name, f"{n_in}->{n_out} dropout")
                capture(lab, K._lowrank_fwd, torch.empty_like(g), x, A, B, None, 2.0, h, dot, prec, seed, 0.1)
                capture(lab, K._lowrank_bwd, g, x, A, B, None, h, 2.0, (True, True, True, False), dot, prec,
                        torch.empty_like(x), seed, 0.1)  # dx accumulated into, as lowrank_linear does
                capture(lab, K.dropout_mask, seed, N, n_in, 0.1)
                s = 8  # SeRA r = split = 8
                As = torch.empty(s, n_in // s, 1, dtype=par, **cuda)
                C = torch.empty(s, s, dtype=par, **cuda)
                Bs = torch.empty(s, 1, n_out // s, dtype=par, **cuda)
                h1 = torch.empty(N, s, dtype=torch.float32, **cuda)
                lab = (name, f"{n_in}->{n_out}")
                capture(lab, K._sera_fwd, x, As, C, Bs, 2.0, h1, torch.empty_like(g), dot, prec)
                capture(lab, K._sera_bwd, g, x, As, C, Bs, h1, 2.0, (True,) * 4, dot, prec)
                Br = torch.empty(n_in // b_bone, b_bone, b_bone, dtype=par, **cuda)
                capture(lab, K._bone_row_fwd, x, Br)
                capture(lab, K._bone_row_bwd, x, torch.empty(N, b_bone, dtype=act, **cuda), x, Br, True, True)
                W = torch.empty(n_out, n_in, dtype=wt, **cuda)
                Bc = torch.empty(n_out // b_bone, b_bone, b_bone, dtype=par, **cuda)
                capture(lab, K._bone_col_wprime, W, Bc, act)
                capture(lab, K._bone_col_dB, torch.empty(n_out, n_in, dtype=act, **cuda), W, Bc)
        # VB-LoRA's launchers choose nothing by device: real CPU tensors, logits and bank in the param dtype
        S, hb, bv, k = 512, 256, 256, 2
        logits, bank = torch.randn(S, hb, dtype=par), torch.randn(hb, bv, dtype=par)
        lab = (name, f"h={hb} b={bv} k={k}")
        capture(lab, K._vblora_compose_fwd, logits, bank, k)
        idx, wgt = torch.topk(logits, k, dim=-1)[1], torch.rand(S, k)
        capture(lab, K._vblora_compose_bwd, torch.randn(S, bv, dtype=par), idx, wgt, bank, par, True, True)

    def jit_fn(kern):
        return kern.fn if isinstance(kern, Autotuner) else kern

    reached = {jit_fn(kern) for kern, *_ in records}
    missing = sorted(n for n, v in launched.items() if jit_fn(v) not in reached)
    assert not missing, f"no launcher case reaches {missing}"

    seen, tuned, failures, total = set(), set(), [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for kern, args, kw, dset, label in records:
            configs = [{}]
            if isinstance(kern, Autotuner):  # every config on its first launch per dtype set, then the first
                configs = [c.all_kwargs() for c in kern.configs][:1 if (kern, dset) in tuned else None]
                tuned.add((kern, dset))
            fn = jit_fn(kern)
            for ci, cfg in enumerate(configs):
                bound, spec, opts = create_function_from_signature(fn.signature, fn.params, backend)(
                    *args, **{**kw, **cfg})
                opts, sig, constexprs, attrs = fn._pack_args(backend, {**kw, **cfg}, bound, spec, opts)
                key = repr((fn.__name__, sig, constexprs, attrs, opts.num_warps, opts.num_stages))
                if key in seen:
                    continue
                seen.add(key)
                consts = " ".join(f"{fn.arg_names[i]}={v}" for (i,), v in constexprs.items())
                ptrs = " ".join(f"{n}={t}" for n, t in sig.items() if t.startswith("*"))
                cfg_name = f" cfg{ci}" if isinstance(kern, Autotuner) else ""
                desc = f"{fn.__name__} [{dset} {label}{cfg_name}] {consts} warps={opts.num_warps} " \
                       f"stages={opts.num_stages} {ptrs}"
                t0 = time.perf_counter()
                try:
                    c = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target,
                                       options=opts.__dict__)
                except Exception as e:  # collect them all: one broken kernel must not hide the others
                    failures.append(f"{desc}\n    {type(e).__name__}: {str(e)[-2000:]}")
                    print(f"FAIL {desc}", flush=True)
                    continue
                assert c.asm.get("cubin"), desc
                assert c.metadata.shared <= 232448, f"{desc}: {c.metadata.shared} B shared memory > H100's 227 KiB"
                path = os.path.join(tmp, "k.cubin")
                with open(path, "wb") as f:
                    f.write(c.asm["cubin"])
                res = subprocess.run([os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                                                   "cuobjdump"), "-res-usage", path],
                                     capture_output=True, text=True).stdout
                use = " ".join(w for w in res.split() if w.split(":")[0] in ("REG", "STACK", "LOCAL"))
                print(f"ok {time.perf_counter() - t0:5.1f}s {use} smem={c.metadata.shared} {desc}", flush=True)
    print(f"{len(seen)} compiles in {time.perf_counter() - total:.1f}s, {len(failures)} failed")
    assert not failures, "\n".join(failures)


def test_aot_every_kernel_compiles_for_h100():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANOPEFT_NO_TRITON")}
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # compile from scratch every run
        repo = os.path.dirname(os.path.abspath(kernels.__file__))
        code = textwrap.dedent(inspect.getsource(_aot_compile_all)) + f"\n_aot_compile_all({repo!r})\n"
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    print(p.stdout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-6000:]


# ================================================================================================
# train_gpt2.py
# ================================================================================================
import csv
import json
import shutil
import subprocess
import types

import tiktoken

import bone
import lora
import sera
import siva
import train_gpt2
import vblora


def _gpt2_enc():
    """A byte-level tiktoken encoding (no merges, no files): ids 0..255 = bytes, 256 = <|endoftext|>."""
    return tiktoken.Encoding(name="nanopeft_test_bytes", pat_str=r"\S+|\s+",
                             mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


def _gpt2_write_e2e(folder):
    """Official-format E2E CSVs (header mr,ref, quoted fields, CRLF) with a few synthetic rows."""
    names, foods = ["Alimentum", "Blue Spice", "Cotto"], ["French", "Italian"]
    rows = [(f"name[{n}], food[{f}]", ref) for n in names for f in foods
            for ref in (f"{n} serves {f} food.", f"{n}, a {f} place, is nice.")]
    splits = {"trainset.csv": rows, "devset.csv": rows[:4], "testset_w_refs.csv": rows[4:10]}
    for name, part in splits.items():
        with open(os.path.join(folder, name), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\r\n")
            w.writerow(["mr", "ref"])
            w.writerows(part)
    return rows


def _gpt2_tiny(vocab=40, block=64, layers=2, heads=2, embd=16, std=0.3):
    """A random float64 GPT whose logits are peaked enough for decoding tests to be meaningful."""
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=block, vocab_size=vocab, n_layer=layers,
                                                n_head=heads, n_embd=embd)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


_GPT2_METHOD_FLAGS = {"none": [], "full": ["--lr", "1e-2"], "lora": ["--lr", "1e-2"], "sera": ["--lr", "1e-2"],
                      "siva": ["--lr", "1e-2"], "bone": ["--lr", "1e-2", "--bone_b", "16"],
                      "vblora": ["--vblora_b", "16", "--vblora_h", "8", "--vblora_bank_lr", "1e-2"]}


def _gpt2_argv(folder, out, method, *extra):
    """A tiny scratch run on the synthetic E2E in `folder` (vocab 257: the byte-level encoding)."""
    return ["--method", method, "--init_from", "scratch", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
            "--block_size", "128", "--data_dir", str(folder), "--out_dir", str(out), "--batch_size", "2",
            "--warmup_iters", "1", "--log_interval", "1", "--eval_interval", "1", "--eval_iters", "2",
            "--beam", "2", "--max_new_tokens", "8", "--device", "cpu", *_GPT2_METHOD_FLAGS[method], *extra]


def _gpt2_main(argv):
    """train_gpt2.main with the byte-level encoding in place of GPT-2's BPE."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_gpt2, "get_tokenizer", lambda bpe_dir=None, online=None: _gpt2_enc())
        return train_gpt2.main([str(a) for a in argv])


def _gpt2_error(argv):
    """The one-line message main exits with, before it writes anything."""
    with pytest.raises(SystemExit) as e:
        _gpt2_main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def _gpt2_decode(model, enc, mrs):
    prompts = [enc.encode_ordinary(mr) + [enc.eot_token] for mr in mrs]
    return [" ".join(enc.decode(t).split()) for t in train_gpt2.beam_search(model, prompts, enc.eot_token, beam=2,
                                                                              max_new_tokens=8)]


@pytest.fixture(scope="module")
def _gpt2_lora_run(tmp_path_factory):
    """One finished LoRA run on q, v and lm_head (4 steps, step-2 and step-4 checkpoints), shared read-only;
    a test that resumes it works on a copy (_gpt2_copy)."""
    folder = tmp_path_factory.mktemp("gpt2_lora")
    _gpt2_write_e2e(folder)
    argv = _gpt2_argv(folder, folder / "out", "lora", "--targets", "q_proj,v_proj,lm_head", "--max_iters", "4",
                      "--eval_interval", "2", "--eval_samples", "2")
    return types.SimpleNamespace(folder=folder, out=folder / "out", argv=argv, res=_gpt2_main(argv))


def _gpt2_copy(run, tmp_path):
    """The shared run's argv pointed at a copy of its --out_dir."""
    out = tmp_path / "out"
    shutil.copytree(run.out, out)
    return [str(out) if a == str(run.out) else a for a in run.argv]


# ---- model: Hugging Face GPT-2 checkpoints map onto our names


def _gpt2_hf_reference(sd, idx, n_layer, n_head):
    """GPT-2's forward written directly on the HF tensors: fused c_attn, Conv1D (x @ W + b), tied head."""
    C = sd["wte.weight"].shape[1]
    ln = lambda x, p: F.layer_norm(x, (C,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)
    B, T = idx.shape
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(n_layer):
        p = f"h.{i}."
        qkv = ln(x, p + "ln_1") @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=-1))
        att = (q @ k.transpose(-1, -2) / math.sqrt(C // n_head)).masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = F.gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ sd["wte.weight"].T


def test_gpt2_hf_checkpoint_loads_with_split_qkv(tmp_path):
    from safetensors.torch import save_file
    V, T, C, H, L = 50, 16, 32, 4, 2
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    sd = {"wte.weight": r(V, C), "wpe.weight": r(T, C), "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(L):
        p = f"h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C), p + "ln_2.weight": 1 + r(C),
                   p + "ln_2.bias": r(C), p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
                   p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
                   p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
                   p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
                   p + "attn.bias": torch.ones(T, T).tril().view(1, 1, T, T)})  # HF's causal-mask buffer
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"n_head": H}))  # 32 // 64 would be wrong: must be read
    lm = {"transformer." + k: v for k, v in sd.items()}  # GPT2LMHeadModel layout: prefixed, with lm_head
    lm["lm_head.weight"] = sd["wte.weight"]
    torch.save(lm, tmp_path / "pytorch_model.bin")

    idx = torch.randint(0, V, (2, 11), generator=g)
    want = _gpt2_hf_reference(sd, idx, L, H)
    for source in (str(tmp_path), str(tmp_path / "pytorch_model.bin")):
        model = train_gpt2.load_gpt2(source).eval()
        assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (L, H, C)
        assert isinstance(model.transformer.h[1].attn.q_proj, nn.Linear)
        assert model.lm_head.weight is model.transformer.wte.weight
        logits, _ = model(idx, targets=torch.zeros_like(idx))  # all positions kept: (B*T, V)
        torch.testing.assert_close(logits.view(2, 11, V), want, atol=1e-4, rtol=1e-4)
    q = model.transformer.h[0].attn.q_proj.weight
    torch.testing.assert_close(q, sd["h.0.attn.c_attn.weight"][:, :C].T)  # Conv1D (in, out) -> Linear (out, in)


# ---- data: the loss sees exactly the reference tokens; bad files are named with their line


def test_gpt2_loss_mask_covers_exactly_the_reference():
    enc = _gpt2_enc()
    eos = enc.eot_token
    rows = [("name[Cotto], food[French]", "Cotto serves French food, cheap."), ("name[A]", "A.")]
    examples = train_gpt2.encode_e2e(rows, enc, 512)
    x, y = train_gpt2.collate(examples, pad=eos)
    assert x.shape == y.shape == (2, max(len(t) for t, _ in examples) - 1)
    for i, (mr, ref) in enumerate(rows):
        tokens, n_prompt = examples[i]
        ref_tokens = enc.encode_ordinary(" " + ref) + [eos]
        assert tokens == enc.encode_ordinary(mr) + [eos] + ref_tokens
        assert n_prompt == len(enc.encode_ordinary(mr)) + 1
        kept = (y[i] != train_gpt2.IGNORE).nonzero().flatten()
        assert y[i, kept].tolist() == ref_tokens  # every reference token and the final EOS, nothing else
        assert kept.tolist() == list(range(n_prompt - 1, len(tokens) - 1))
        assert x[i, :len(tokens) - 1].tolist() == tokens[:-1]


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"mr,ref\r\n", "has a header but no rows"),
    (b"mr,ref\r\nname[A],A.\r\nname[B]\r\n", "line 3: expected two non-empty fields"),
    (b'mr,ref\r\nname[A],A.\r\n"name[B]",""\r\n', "line 3: expected two non-empty fields"),
    (b"mr,ref\r\nname[A],A.\r\nname[B],caf\xe9\r\n", "line 3: not UTF-8"),
    (b"MR\r\nname[A]\r\n", "line 1: expected the header mr,ref"),
])
def test_gpt2_bad_e2e_file_fails_before_training_naming_file_and_line(tmp_path, content, message):
    _gpt2_write_e2e(tmp_path)
    for split in ("trainset.csv", "testset_w_refs.csv"):
        (tmp_path / split).write_bytes(content)  # today: header-only trains 0 steps and writes an adapter
        msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora"))
        assert msg.startswith(f"error: {tmp_path / split}") and message in msg, msg
        assert not (tmp_path / "out").exists()
        _gpt2_write_e2e(tmp_path)


# ---- flags: every bad value is one line before anything is loaded or trained


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "error: --batch_size 0: must be >= 1"),
    (["--grad_accum", "0"], "error: --grad_accum 0: must be >= 1"),
    (["--n_head", "3"], "error: --n_embd 32 is not divisible by --n_head 3"),
    (["--beam", "0"], "error: --beam 0: must be >= 1"),
    (["--lr", "-0.001"], "error: --lr -0.001: must be >= 0"),
    (["--max_iters", "-1"], "error: --max_iters -1: must be >= 0"),
    (["--block_size", "36"], "error: --block_size 36 is too short: the longest test MR takes 32 tokens, "
                             "+ --max_new_tokens 8 = 40"),
    (["--lora_r", "0"], "error: --method lora: LoRA: r=0"),
    (["--block_size", "24"], "error: no training example fits in 24 tokens (--max_len 512, --block_size 24)"),
    (["--targets", "nope"], "error: --method lora: LoRA: target 'nope' matches no nn.Linear"),
    (["--resume", "--overwrite"], "error: --resume and --overwrite: pass one of them"),
])
def test_gpt2_bad_flags_fail_before_training(tmp_path, flags, message):
    _gpt2_write_e2e(tmp_path)
    msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora", *flags))
    assert msg.startswith(message), msg
    assert not (tmp_path / "out" / "adapter.pt").exists()


def test_gpt2_method_config_error_is_one_line(tmp_path):
    _gpt2_write_e2e(tmp_path)
    msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "sera", "--sera_r", "8", "--sera_split", "3"))
    assert msg.startswith("error: --method sera: ") and "split=3" in msg
    args = train_gpt2.get_args(["--method", "sera", "--sera_r", "4"])
    assert args.sera_split is None and train_gpt2.METHODS["sera"][0](args).split == 4  # split = r by default


# ---- decoding


def _gpt2_greedy(model, prompt, eos, max_new, n):
    """Greedy decoding recomputing the whole sequence each step (no cache), fairseq-style n-gram bans."""
    toks, gen = list(prompt), []
    for _ in range(max_new):
        logp = model(torch.tensor([toks]))[0][0, -1].log_softmax(-1)
        if n and len(gen) >= n:
            for i in range(len(gen) - n + 1):
                if gen[i:i + n - 1] == gen[len(gen) - n + 1:]:
                    logp[gen[i + n - 1]] = float("-inf")
        nxt = int(logp.argmax())
        if nxt == eos:
            break
        gen.append(nxt)
        toks.append(nxt)
    return gen


def test_gpt2_beam1_is_greedy():
    model = _gpt2_tiny()
    prompts = [[5, 6, 7], [1], [9, 8, 7, 6, 5, 4, 3], [2, 2]]
    for no_repeat in (0, 3):
        got = train_gpt2.beam_search(model, prompts, eos=3, beam=1, max_new_tokens=12, no_repeat_ngram=no_repeat)
        assert got == [_gpt2_greedy(model, p, 3, 12, no_repeat) for p in prompts]


def test_gpt2_batched_beam_equals_per_prompt_beam():
    model = _gpt2_tiny()
    prompts = [[5, 6, 7], [1], [9, 8, 7, 6, 5, 4, 3, 2], [2, 2, 11, 12, 13]]
    batched = train_gpt2.beam_search(model, prompts, eos=3, beam=3, max_new_tokens=10, no_repeat_ngram=3)
    single = [train_gpt2.beam_search(model, [p], eos=3, beam=3, max_new_tokens=10, no_repeat_ngram=3)[0]
              for p in prompts]
    assert batched == single
    assert len({tuple(s) for s in single}) > 1  # the prompts really lead to different outputs


def _gpt2_has_repeat(tokens, n):
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def test_gpt2_no_repeat_ngram_is_respected():
    model = _gpt2_tiny(std=1.0)
    with torch.no_grad():  # blocks add nothing and positions are blank: the next token is the current one
        for p in model.transformer.h.parameters():
            p.zero_()
        model.transformer.wpe.weight.zero_()
    prompts = [[5], [7, 8]]
    free = train_gpt2.beam_search(model, prompts, eos=3, beam=2, max_new_tokens=20, no_repeat_ngram=0)
    assert all(_gpt2_has_repeat(t, 4) for t in free)  # without the rule this model loops
    for beam in (1, 3):
        out = train_gpt2.beam_search(model, prompts, eos=3, beam=beam, max_new_tokens=20, no_repeat_ngram=4)
        assert all(len(t) == 20 and not _gpt2_has_repeat(t, 4) for t in out)


# ---- metrics against hand computations


def test_gpt2_bleu_by_hand():
    hyp = "the cat sat on the mat"
    # MR 1: exact match with ref 1: 1-4-gram matches 6/6, 5/5, 4/4, 3/3; closest ref length 6.
    # MR 2: refs "the cat is on the mat" / "there is a cat on the mat"; clipped matches:
    #   1g the x2, cat, on, mat = 5/6; 2g "the cat", "on the", "the mat" = 3/5; 3g "on the mat" = 1/4;
    #   4g 0/3; closest ref length 6 (ref 1). Corpus: 11/12, 8/10, 5/8, 3/6, lengths 12 vs 12 -> BP 1.
    refs = [[hyp, "a cat was on a mat"], ["the cat is on the mat", "there is a cat on the mat"]]
    bleu, _ = train_gpt2.bleu_nist([hyp, hyp], refs)
    assert bleu == pytest.approx((11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25, abs=1e-12)
    # brevity: hyp length 3, closest ref 6 -> BP exp(1 - 6/3); p1..p3 = 1; no 4-gram at all: mteval counts p4 = 1
    bleu, _ = train_gpt2.bleu_nist(["the cat sat"], [["the cat sat on the mat", "the cat sat on a red mat"]])
    assert bleu == pytest.approx(math.exp(-1.0), abs=1e-12)
    # tie in distance (lengths 2 and 4 around 3): the shorter is taken, so no brevity penalty
    bleu, _ = train_gpt2.bleu_nist(["a b c"], [["a b", "a b c d"]])
    assert bleu == pytest.approx(1.0, abs=1e-12)
    # tokenisation: case and punctuation (split off, except inside numbers) do not matter
    bleu, _ = train_gpt2.bleu_nist(["The Cat, costs 2.50."], [["the cat , costs 2.50 ."]])
    assert bleu == pytest.approx(1.0, abs=1e-12)
    # a 4-gram precision of 0 is smoothed to 1/(2 * count): MR 2 alone, (5/6 * 3/5 * 1/4 * 1/6)^(1/4)
    bleu, _ = train_gpt2.bleu_nist([hyp], refs[1:])
    assert bleu == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, abs=1e-12)


def test_gpt2_nist_by_hand():
    # one ref "a b": info(a) = info(b) = log2(2 words / 1) = 1, info(a b) = log2(count(a) / count(a b)) = 0
    _, nist = train_gpt2.bleu_nist(["a b"], [["a b"]])
    assert nist == pytest.approx(1.0, abs=1e-12)  # (1 + 1) / 2 unigrams + 0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    _, nist = train_gpt2.bleu_nist(["a"], [["a b"]])  # 1 / 1, length ratio 1/2
    assert nist == pytest.approx(math.exp(-beta * math.log(0.5) ** 2), abs=1e-12)
    # reference words 2 + 6 + 2 = 10 over the most references of an MR (2), as mteval sees the padded sets:
    # ratio 4 / 5; info(a) = info(b) = log2(10 / 3), info(a b) = log2(3 / 3) = 0
    _, nist = train_gpt2.bleu_nist(["a b", "a b"], [["a b", "a b c d e f"], ["a b"]])
    assert nist == pytest.approx(math.log2(10 / 3) * math.exp(-beta * math.log(0.8) ** 2), abs=1e-12)


def test_gpt2_rouge_meteor_cider_by_hand():
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4: P 4/6, R 4/5
    f = lambda p, r: (1 + 1.44) * p * r / (r + 1.44 * p)
    assert train_gpt2.rouge_l(["the cat sat on the mat"], [["the cat on a mat"]]) == pytest.approx(f(4 / 6, 4 / 5))
    # a second reference "cat" raises the max recall to 1 while the max precision stays 4/6 (taken separately)
    got = train_gpt2.rouge_l(["the cat sat on the mat"], [["the cat on a mat", "cat"]])
    assert got == pytest.approx(f(4 / 6, 1.0))
    assert train_gpt2.rouge_l(["The cat sat."], [["the cat sat"]]) == pytest.approx(1.0)  # punctuation dropped

    assert train_gpt2.meteor_exact(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    # P = R = 1, 2 chunks of 4 matches: 1 - 0.6 * (2/4)^0.2
    assert train_gpt2.meteor_exact(["a b c d"], [["c d a b"]]) == pytest.approx(1 - 0.6 * 0.5 ** 0.2)
    # 2 of 3 words, one chunk: Fmean = (4/9) / (2/3) = 2/3, penalty 0.6 * (1/2)^0.2
    got = train_gpt2.meteor_exact(["the cat sat"], [["the cat ran", "dogs"]])
    assert got == pytest.approx(2 / 3 * (1 - 0.6 * 0.5 ** 0.2))

    refs = [["a b c d"], ["e f g h"]]
    assert train_gpt2.cider_d(["a b c d", "e f g h"], refs) == pytest.approx(10.0)  # identical, 1-4-grams
    assert train_gpt2.cider_d(["x y z w", "v u t s"], refs) == 0.0
    assert 0 < train_gpt2.cider_d(["a b c d x", "e f g h"], refs) < 10.0


# ---- offline and first run: one probe, one message naming every missing resource and its flag


def test_gpt2_offline_names_every_missing_resource_at_once(monkeypatch, tmp_path):
    probes = []
    monkeypatch.setattr(train_gpt2, "network_ok", lambda timeout=3.0: probes.append(1) or False)
    monkeypatch.setattr(train_gpt2, "SHARED_BPE_DIR", str(tmp_path / "absent"))

    def fail(*a, **k):
        raise AssertionError("a download was tried although the probe said offline")
    monkeypatch.setattr(tiktoken, "get_encoding", fail)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fail))
    import huggingface_hub

    def hub(repo, name, local_files_only=False):
        assert local_files_only, "a download was tried although the probe said offline"
        raise FileNotFoundError("not in the cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(["--method", "vblora", "--out_dir", str(tmp_path / "out")])
    msg = str(e.value.code)
    assert probes == [1] and msg.startswith("error: no network")
    for needed in ("vocab.bpe", "--bpe_dir", "tuetschek/e2e_nlg", "--data_dir", "openai-community/gpt2-medium",
                   "--init_from PATH", "--init_from scratch"):
        assert needed in msg, (needed, msg)
    # a local --bpe_dir is read without a download; a wrong one is named
    with pytest.raises(SystemExit, match="--bpe_dir .*vocab.bpe and encoder.json"):
        train_gpt2.get_tokenizer(str(tmp_path))


def test_gpt2_explicit_bpe_dir_is_used_without_a_download(monkeypatch, tmp_path):
    import tiktoken.load

    def no_download(*a, **k):
        raise AssertionError("tiktoken.get_encoding called although --bpe_dir was given")
    read = []

    def ranks(bpe, enc_json, *hashes):
        read.append((bpe, enc_json))
        return {bytes([i]): i for i in range(256)}
    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    monkeypatch.setattr(tiktoken.load, "data_gym_to_mergeable_bpe_ranks", ranks)
    for f in ("vocab.bpe", "encoder.json"):
        (tmp_path / f).write_text("x")
    enc = train_gpt2.get_tokenizer(str(tmp_path))
    assert read == [(str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json"))]
    assert enc.encode_ordinary("ab") == [97, 98] and enc.eot_token == 50256


# ---- the script end to end, every method; its adapter.pt reloads with load_finetuned


def _gpt2_fresh(method):
    """The smoke run's model rebuilt by hand as main builds it (seed 1), with the same adapter config."""
    torch.manual_seed(1)
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=128, vocab_size=257, n_layer=1, n_head=2, n_embd=32))
    qv = ["q_proj", "v_proj"]
    if method == "lora":
        lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=32, dropout=0.1), qv)
    elif method == "sera":
        sera.apply_sera(model, sera.SeRAConfig(r=8, split=8, alpha=32), qv)
    elif method == "siva":
        siva.apply_siva(model, siva.SiVAConfig(perc=0.95), qv)
    elif method == "bone":
        bone.apply_bone(model, bone.BoneConfig(b=16, grouping="col"), qv)
    elif method == "vblora":
        vblora.apply_vblora(model, vblora.VBLoRAConfig(r=4, b=16, h=8, k=2),
                            ["q_proj", "k_proj", "v_proj", "attn.c_proj", "c_fc", "mlp.c_proj"])
    return model.eval()


@pytest.mark.parametrize("method", ["none", "full", "lora", "sera", "siva", "bone", "vblora"])
def test_gpt2_smoke_every_method(method, tmp_path, capsys):
    enc = _gpt2_enc()
    _gpt2_write_e2e(tmp_path)
    out = tmp_path / "out"
    res = _gpt2_main(_gpt2_argv(tmp_path, out, method, "--max_iters", "2", "--eval_samples", "2"))
    log = capsys.readouterr().out
    assert "trainable params" in log and "BLEU" in log
    assert "decode 2/2 MRs | elapsed 0:00:0" in log and "| eta 0:00:00" in log  # progress while decoding
    assert res["step"] == (0 if method == "none" else 2)
    assert all(math.isfinite(v) for v in res["scores"].values()) and len(res["predictions"]) == 2
    assert (out / "predictions.txt").read_text(encoding="utf-8").count("\n") == 2
    assert (out / "references.txt").read_text(encoding="utf-8").split("\n\n")[0].count("\n") == 1  # 2 refs, MR 1

    blob = torch.load(out / "adapter.pt", weights_only=True)
    assert blob["method"] == blob["args"]["method"] == method and blob["args"]["n_embd"] == 32
    sd = blob["adapter"]
    fresh, trained = _gpt2_fresh(method), res["model"].eval()
    reloaded = train_gpt2.load_finetuned(str(out / "adapter.pt"))  # one call instead of the lines below
    x = torch.randint(0, 257, (2, 9))
    y = torch.zeros_like(x)
    with torch.no_grad():
        before = fresh(x, y)[0]
        if method in train_gpt2.METHODS:
            train_gpt2.METHODS[method][3](fresh, sd)
        else:
            fresh.load_state_dict(sd, strict=False)
        assert_close(fresh(x, y)[0], trained(x, y)[0])
        assert_close(reloaded(x, y)[0], trained(x, y)[0])
        if method != "none":
            assert (before - trained(x, y)[0]).abs().max() > 1e-4  # training moved it; the reload matters
        if method == "full":  # a full fine-tune reloads as a checkpoint with its own n_head (not n_embd / 64 = 0)
            again = train_gpt2.load_gpt2(str(out / "adapter.pt")).eval()
            assert again.config.n_head == 2
            assert_close(again(x, y)[0], trained(x, y)[0])
    mrs = ["name[Blue Spice], food[French]", "name[Blue Spice], food[Italian]"]
    assert _gpt2_decode(fresh, enc, mrs) == _gpt2_decode(reloaded, enc, mrs) == res["predictions"]


def test_gpt2_lm_head_adapter_decodes_and_leaves_the_embedding(_gpt2_lora_run):
    # beam search used to read model.lm_head.weight: an AttributeError once LoRA wraps lm_head
    model = _gpt2_lora_run.res["model"]
    assert isinstance(model.lm_head, lora.LoRALinear) and not model.lm_head.merged
    assert len(_gpt2_lora_run.res["predictions"]) == 2
    base = _gpt2_fresh("none")
    assert_close(model.transformer.wte.weight, base.transformer.wte.weight)  # nothing merged into the tied wte
    assert model.transformer.wte.weight is model.lm_head.base.weight


def test_gpt2_sample_decodes_one_mr_with_a_saved_adapter(_gpt2_lora_run, capsys):
    run = _gpt2_lora_run
    res = _gpt2_main(["--sample", "name[Blue Spice] | food[French]", "--out_dir", run.out, "--beam", "2",
                      "--max_new_tokens", "8", "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[-1] == res["sample"]
    assert [res["sample"]] == _gpt2_decode(run.res["model"], _gpt2_enc(), ["name[Blue Spice], food[French]"])
    msg = _gpt2_error(["--sample", "name[A]", "--adapter", run.folder / "nope.pt"])
    assert msg.startswith("error: --sample needs an adapter.pt")


# ---- output directories, checkpoints and resume


def test_gpt2_out_dir_with_a_run_is_refused_without_resume_or_overwrite(_gpt2_lora_run, tmp_path):
    before = (_gpt2_lora_run.out / "ckpt.pt").read_bytes()
    msg = _gpt2_error(_gpt2_lora_run.argv)
    assert msg == f"error: {_gpt2_lora_run.out / 'ckpt.pt'} exists; pass --resume to continue that run or " \
                  f"--overwrite to start over"
    assert (_gpt2_lora_run.out / "ckpt.pt").read_bytes() == before
    res = _gpt2_main(_gpt2_copy(_gpt2_lora_run, tmp_path) + ["--overwrite", "--max_iters", "1", "--eval_samples", "0"])
    assert res["step"] == 1 and torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 1


def test_gpt2_resume_refuses_flags_that_alter_the_run(_gpt2_lora_run, tmp_path):
    argv = _gpt2_copy(_gpt2_lora_run, tmp_path) + ["--resume"]
    msg = _gpt2_error(argv + ["--lr", "2e-4"])  # today: silently trains on at the saved run's lr
    assert msg.startswith("error: --resume: --lr 0.01 -> 0.0002 would alter the saved run; only --beam")
    msg = _gpt2_error(argv + ["--seed", "9", "--lora_r", "8"])  # today: a new scratch base from seed 9
    assert "--lora_r 4 -> 8, --seed 1 -> 9 would alter" in msg
    res = _gpt2_main(argv + ["--max_iters", "6", "--eval_samples", "0", "--log_interval", "3"])  # extend: allowed
    assert res["step"] == 6


def test_gpt2_resume_with_other_shapes_is_one_line(_gpt2_lora_run, tmp_path):
    argv = _gpt2_copy(_gpt2_lora_run, tmp_path) + ["--resume"]
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    name = next(k for k in ckpt["trainable"] if k.endswith("lora_A"))
    ckpt["trainable"][name] = torch.zeros(3, 32)  # today: a RuntimeError traceback from load_state_dict
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    msg = _gpt2_error(argv)
    assert msg.startswith(f"error: --resume: {tmp_path / 'out' / 'ckpt.pt'} does not fit this model: ") and name in msg


@pytest.mark.parametrize("content, message", [
    (b"", "is not a readable checkpoint (truncated or not a torch file): "),
    (b"truncated", "is not a readable checkpoint (truncated or not a torch file): "),
    (None, "is not a ckpt.pt of train_gpt2.py: no step, trainable, optimizer, rng"),
])
def test_gpt2_bad_checkpoint_file_is_one_line(_gpt2_lora_run, tmp_path, content, message):
    argv = _gpt2_copy(_gpt2_lora_run, tmp_path) + ["--resume"]
    path = tmp_path / "out" / "ckpt.pt"
    if content is None:  # a torch file with the wrong content (today: KeyError)
        torch.save({"args": {}}, path)
    else:  # empty or truncated (today: EOFError / RuntimeError tracebacks)
        path.write_bytes(path.read_bytes()[:100] if content == b"truncated" else content)
    assert _gpt2_error(argv).startswith(f"error: {path} {message}")
    with pytest.raises(SystemExit, match=f"error: {path} is not a"):
        train_gpt2.load_finetuned(str(path))


def test_gpt2_save_atomic_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or replace(a, b))
    path = str(tmp_path / "ckpt.pt")
    train_gpt2.save_atomic({"x": torch.ones(2)}, path)
    assert events == [("fsync", path + ".tmp"), ("replace", path + ".tmp"), ("fsync", str(tmp_path))]
    assert torch.load(path, weights_only=True)["x"].tolist() == [1.0, 1.0]


class _Gpt2Stop(Exception):
    pass


def test_gpt2_resume_continues_the_same_run(tmp_path, monkeypatch):
    _gpt2_write_e2e(tmp_path)
    flags = ["--grad_accum", "2", "--warmup_iters", "10", "--eval_samples", "0"]  # 6 batches/epoch: crosses one
    straight = _gpt2_main(_gpt2_argv(tmp_path, tmp_path / "a", "lora", *flags, "--max_iters", "4"))
    save_atomic = train_gpt2.save_atomic

    def save_then_stop(obj, path):  # the same run killed right after its step-2 checkpoint
        save_atomic(obj, path)
        if obj.get("step") == 2:
            raise _Gpt2Stop
    monkeypatch.setattr(train_gpt2, "save_atomic", save_then_stop)
    with pytest.raises(_Gpt2Stop):
        _gpt2_main(_gpt2_argv(tmp_path, tmp_path / "b", "lora", *flags, "--max_iters", "4"))
    monkeypatch.setattr(train_gpt2, "save_atomic", save_atomic)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 2
    resumed = _gpt2_main(_gpt2_argv(tmp_path, tmp_path / "b", "lora", *flags, "--max_iters", "4", "--resume"))
    assert straight["step"] == resumed["step"] == 4
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys() and any(k.endswith("lora_B") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert any(v.abs().max() > 0 for k, v in a.items() if k.endswith("lora_B"))  # it did train


def test_gpt2_resume_with_method_none_exits_cleanly(tmp_path):
    _gpt2_write_e2e(tmp_path)
    assert "--method none" in _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "none", "--resume"))


def test_gpt2_lr_schedule_shorter_than_warmup_still_reaches_the_lr():
    # by hand: warm-up (step+1)/w with w = min(warmup, total), then (total-step)/(total-w)
    assert [train_gpt2.lr_factor(s, 500, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [train_gpt2.lr_factor(s, 2, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


# ---- multi-process: torchrun with gloo on CPU gives the 1-process adapter


_GPT2_TORCHRUN = """
import sys
sys.path.insert(0, {repo!r})
import tiktoken
import train_gpt2
enc = tiktoken.Encoding(name="nanopeft_test_bytes", pat_str=r"\\S+|\\s+",
                        mergeable_ranks={{bytes([i]): i for i in range(256)}}, special_tokens={{"<|endoftext|>": 256}})
train_gpt2.get_tokenizer = lambda bpe_dir=None, online=None: enc  # as _gpt2_enc: no BPE files needed
train_gpt2.main({argv!r})
"""


@pytest.mark.parametrize("method, flags", [("vblora", []), ("lora", ["--lora_dropout", "0"])])
def test_gpt2_torchrun_two_processes_give_the_one_process_adapter(tmp_path, method, flags):
    # 2 processes x --grad_accum 1 == 1 process x --grad_accum 2: the same global batches, the same gradients.
    # VB-LoRA's bank is one parameter shared by every layer; LoRA runs without dropout (masks differ per rank).
    _gpt2_write_e2e(tmp_path)
    argv = lambda out, *x: _gpt2_argv(tmp_path, tmp_path / out, method, "--max_iters", "3", "--eval_iters", "1",
                                      "--beam", "1", "--eval_samples", "1", *flags, *x)
    script = _GPT2_TORCHRUN.format(repo=os.path.dirname(os.path.abspath(__file__)),
                                   argv=[str(a) for a in argv("two", "--grad_accum", "1")])
    (tmp_path / "run.py").write_text(script)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(tmp_path / "run.py")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("step 1/3 |") == 1 and p.stdout.count("saved ") == 1  # rank 0 alone logs and saves
    one = _gpt2_main(argv("one", "--grad_accum", "2"))
    assert (tmp_path / "two" / "predictions.txt").read_text() == "".join(p + "\n" for p in one["predictions"])
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys() and (method != "vblora" or "vblora_bank.vectors" in a)
    for k in a:
        assert_close(b[k], a[k])
    init = dict(_gpt2_fresh(method).named_parameters())
    assert any((a[k] - init[k]).abs().max() > 0 for k in a)  # it trained


# ================================================================================================
# train_vit.py
# ================================================================================================
import json

import numpy as np

import train_vit

_VIT_TINY = dict(depth=2, dim=32, heads=2, patch=4, image=16, mlp=64, classes=5)


def _vit_fake_hf_state(prefix="vit.", classifier=True, L=_VIT_TINY["depth"], D=_VIT_TINY["dim"],
                       P=_VIT_TINY["patch"], image=_VIT_TINY["image"], M=_VIT_TINY["mlp"], C=_VIT_TINY["classes"]):
    """Random tensors under Google/HF ViT names (ViTModel layout, plus pooler and an optional classifier)."""
    r = lambda *s: torch.randn(*s) * 0.2
    n = (image // P) ** 2
    sd = {f"{prefix}embeddings.cls_token": r(1, 1, D),
          f"{prefix}embeddings.position_embeddings": r(1, n + 1, D),
          f"{prefix}embeddings.patch_embeddings.projection.weight": r(D, 3, P, P),
          f"{prefix}embeddings.patch_embeddings.projection.bias": r(D),
          f"{prefix}layernorm.weight": 1 + r(D), f"{prefix}layernorm.bias": r(D),
          "pooler.dense.weight": r(D, D), "pooler.dense.bias": r(D)}
    for i in range(L):
        p = f"{prefix}encoder.layer.{i}."
        for name, shape in [("layernorm_before", (D,)), ("layernorm_after", (D,)),
                            ("attention.attention.query", (D, D)), ("attention.attention.key", (D, D)),
                            ("attention.attention.value", (D, D)), ("attention.output.dense", (D, D)),
                            ("intermediate.dense", (M, D)), ("output.dense", (D, M))]:
            sd[p + name + ".weight"] = (1 + r(*shape)) if name.startswith("layernorm") else r(*shape)
            sd[p + name + ".bias"] = r(shape[0])
    if classifier:
        sd["classifier.weight"], sd["classifier.bias"] = r(C, D), r(C)
    return sd


def _vit_reference_logits(sd, x, n_head, eps=1e-12, prefix="vit."):
    """ViT forward written directly on the HF-named tensors: pre-norm blocks, softmax attention, erf GELU."""
    g = lambda k: sd[prefix + k]
    w = g("embeddings.patch_embeddings.projection.weight")
    h = F.conv2d(x, w, g("embeddings.patch_embeddings.projection.bias"), stride=w.shape[-1])
    h = h.flatten(2).transpose(1, 2)  # (B, N, D)
    B, N, D = h.shape
    h = torch.cat([g("embeddings.cls_token").expand(B, 1, D), h], 1) + g("embeddings.position_embeddings")
    lin = lambda t, k: t @ g(k + ".weight").T + g(k + ".bias")
    ln = lambda t, k: F.layer_norm(t, (D,), g(k + ".weight"), g(k + ".bias"), eps)
    hs = D // n_head
    for i in range(len({k for k in sd if ".layernorm_before.weight" in k})):
        p = f"encoder.layer.{i}."
        a = ln(h, p + "layernorm_before")
        q, k, v = (lin(a, p + "attention.attention." + n).view(B, N + 1, n_head, hs).transpose(1, 2)
                   for n in ("query", "key", "value"))  # (B, nh, T, hs)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs), dim=-1) @ v  # (B, nh, T, hs)
        h = h + lin(att.transpose(1, 2).reshape(B, N + 1, D), p + "attention.output.dense")
        u = lin(ln(h, p + "layernorm_after"), p + "intermediate.dense")
        h = h + lin(0.5 * u * (1 + torch.erf(u / math.sqrt(2))), p + "output.dense")
    return ln(h, "layernorm")[:, 0] @ sd["classifier.weight"].T + sd["classifier.bias"]


def _vit_args(*extra):
    return train_vit.get_args(list(extra))


def _vit_save_hf_dir(tmp_path, sd, heads=_VIT_TINY["heads"]):
    from safetensors.torch import save_file
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"num_attention_heads": heads, "layer_norm_eps": 1e-12,
                                               "hidden_act": "gelu", "model_type": "vit"}))
    return d


@pytest.mark.parametrize("prefix", ["vit.", ""])
def test_vit_hf_checkpoint_maps_key_for_key(tmp_path, prefix):
    sd = _vit_fake_hf_state(prefix)
    d = _vit_save_hf_dir(tmp_path, sd)
    model = train_vit.build_model(_vit_args("--init_from", str(d), "--image_size", "16"), _VIT_TINY["classes"])
    assert model.cfg.n_layer == 2 and model.cfg.n_embd == 32 and model.cfg.patch_size == 4
    assert model.cfg.n_head == 2 and model.cfg.mlp_dim == 64
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        got = model.eval()(x)
        ref = _vit_reference_logits(sd, x, n_head=2, prefix=prefix)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_vit_checkpoint_without_classifier_gets_zero_head_and_other_grid(tmp_path):
    sd = _vit_fake_hf_state(classifier=False)
    d = _vit_save_hf_dir(tmp_path, sd)
    model = train_vit.build_model(_vit_args("--init_from", str(d), "--image_size", "32"), 7)
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 32)  # 4x4 grid interpolated to 8x8
    torch.testing.assert_close(model.pos_embed[0, 0], sd["vit.embeddings.position_embeddings"][0, 0])
    assert torch.equal(model.head.weight, torch.zeros(7, 32))
    v = sd["vit.encoder.layer.1.attention.attention.value.weight"]
    torch.testing.assert_close(model.blocks[1].attn.v_proj.weight, v)


def test_vit_resize_pos_embed_keeps_a_constant_grid():
    pos = torch.cat([torch.full((1, 1, 6), -3.0), torch.full((1, 9, 6), 2.5)], dim=1)  # 3x3 grid
    out = train_vit.resize_pos_embed(pos, 25)
    assert out.shape == (1, 26, 6)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    torch.testing.assert_close(out[:, 1:], torch.full((1, 25, 6), 2.5))


def test_vit_checkpoint_mismatch_lists_every_problem(tmp_path):
    sd = _vit_fake_hf_state()
    sd["vit.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(65, 32)
    del sd["vit.encoder.layer.1.layernorm_after.bias"]
    sd["vit.encoder.layer.0.extra.weight"] = torch.zeros(1)
    model = train_vit.ViT(train_vit.ViTConfig(16, 4, 2, 2, 32, 64, 5))
    with pytest.raises(ValueError) as e:
        train_vit.load_weights(model, train_vit.hf_to_vit(sd))
    msg = str(e.value)
    assert "blocks.0.mlp.fc1.weight: checkpoint (65, 32) vs model (64, 32)" in msg
    assert "blocks.1.ln_2.bias" in msg and "encoder.layer.0.extra.weight" in msg


def test_vit_hub_failure_names_the_repo_and_local_flags(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit) as e:
        train_vit.read_checkpoint("vit-large")
    assert "google/vit-large-patch16-224-in21k" in str(e.value) and "--init_from PATH" in str(e.value)


def test_vit_eval_preprocess_normalises_to_unit_range():
    x = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(3 * 8 * 8).view(2, 3, 8, 8)
    out = train_vit.preprocess(x, 8, train=False)
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out[0], torch.full((3, 8, 8), -1.0)) and torch.equal(out[1], torch.full((3, 8, 8), 1.0))
    big = train_vit.preprocess(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), 24, train=False)
    assert big.shape == (4, 3, 24, 24) and big.min() >= -1 and big.max() <= 1


def test_vit_train_crop_size_range_and_flip():
    x = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    out = train_vit.preprocess(x, 20, train=True)
    assert out.shape == (6, 3, 20, 20) and out.min() >= -1 and out.max() <= 1
    img = torch.rand(1, 3, 8, 8).expand(64, -1, -1, -1)
    same = train_vit.random_resized_crop_flip(img, 8, min_scale=1.0, ratio=(1, 1), flip=False)
    torch.testing.assert_close(same, img)  # the whole image at its own size: identity
    out = train_vit.random_resized_crop_flip(img, 8, min_scale=1.0, ratio=(1, 1))
    flipped = [bool(torch.allclose(o, img[0].flip(-1), atol=1e-6)) for o in out]
    kept = [bool(torch.allclose(o, img[0], atol=1e-6)) for o in out]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_vit_train_crop_is_a_subwindow():
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(16, 3, 32, 32)  # value = x position
    out = train_vit.random_resized_crop_flip(ramp, 32, min_scale=0.25, ratio=(1, 1), flip=False)
    span = out[:, 0, 0, -1] - out[:, 0, 0, 0]  # a box of side s spans about s of the ramp
    assert (span > 0.4).all() and (span < 1.0 + 1e-6).all()
    assert (out[:, :, 1:] - out[:, :, :1]).abs().max() < 1e-6  # no vertical change: rows stay rows


def _vit_write_npz(path, n_train=16, n_test=8, side=16, classes=4, seed=0):
    g = np.random.default_rng(seed)
    np.savez(path, x_train=g.integers(0, 256, (n_train, side, side, 3), dtype=np.uint8),
             y_train=np.arange(n_train) % classes, x_test=g.integers(0, 256, (n_test, side, side, 3), dtype=np.uint8),
             y_test=np.arange(n_test) % classes, class_names=np.array([f"c{i}" for i in range(classes)]))


def test_vit_npz_loading(tmp_path):
    p = str(tmp_path / "d.npz")
    _vit_write_npz(p)
    raw = np.load(p)
    d = train_vit.load_npz(p, 32)  # 16 <= 32: kept at its own size
    assert d["x_train"].shape == (16, 3, 16, 16) and d["x_train"].dtype == torch.uint8
    assert torch.equal(d["x_train"][3], torch.from_numpy(raw["x_train"][3]).permute(2, 0, 1))
    assert d["y_test"].dtype == torch.int64 and d["y_test"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert d["classes"] == ["c0", "c1", "c2", "c3"]
    small = train_vit.load_npz(p, 8)  # larger than the model input: resized once
    assert small["x_test"].shape == (8, 3, 8, 8)


def test_vit_image_folder_loading(tmp_path):
    from PIL import Image
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, sizes in (("train", [(10, 14), (20, 20), (7, 9)]), ("test", [(16, 16)])):
        for c, rgb in colours.items():
            os.makedirs(tmp_path / split / c)
            for i, (w, h) in enumerate(sizes):
                Image.new("RGB", (w, h), rgb).save(tmp_path / split / c / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    d = train_vit.load_folder(str(tmp_path), 12)
    assert d["classes"] == ["cat", "dog"]
    assert d["x_train"].shape == (6, 3, 12, 12) and d["x_train"].dtype == torch.uint8
    assert d["y_train"].tolist() == [0, 0, 0, 1, 1, 1] and d["y_test"].tolist() == [0, 1]
    assert (d["x_train"][0, 0] == 255).all() and (d["x_train"][0, 2] == 0).all()  # solid red survives resizing
    assert (d["x_test"][1, 2] == 255).all() and (d["x_test"][1, 0] == 0).all()


def test_vit_missing_dataset_names_the_local_flag(monkeypatch):
    datasets = pytest.importorskip("datasets")  # in requirements.txt; absent only on a bare GPU box

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as e:
        train_vit.load_hub("pets", 224)
    assert "timm/oxford-iiit-pet" in str(e.value) and "--data PATH" in str(e.value)
    assert "could not reach" in str(e.value) and "Offline?" in str(e.value)


def test_vit_dataset_error_that_is_not_the_network_says_what_failed(monkeypatch):
    datasets = pytest.importorskip("datasets")  # in requirements.txt; absent only on a bare GPU box

    def script(*a, **k):
        try:
            raise KeyError("builder")
        except KeyError as inner:
            raise RuntimeError("Dataset scripts are no longer supported, but found FGVC-Aircraft.py") from inner
    monkeypatch.setattr(datasets, "load_dataset", script)
    with pytest.raises(SystemExit) as e:
        train_vit.load_hub("fgvc", 224)
    msg = str(e.value)
    assert "RuntimeError: Dataset scripts are no longer supported" in msg and "--data PATH" in msg
    assert "Offline?" not in msg and "could not reach" not in msg


def test_vit_hub_dataset_picks_image_and_label_columns(monkeypatch):
    datasets = pytest.importorskip("datasets")  # in requirements.txt; absent only on a bare GPU box
    from PIL import Image

    def split(n, sizes):
        feats = datasets.Features({"family": datasets.ClassLabel(names=["x", "y"]), "image": datasets.Image(),
                                   "variant": datasets.ClassLabel(names=["a", "b", "c"])})
        return datasets.Dataset.from_dict({"family": [i % 2 for i in range(n)],
                                           "image": [Image.new("RGB", sizes[i % 2], (10 * i, 0, 0)) for i in range(n)],
                                           "variant": [(i + 1) % 3 for i in range(n)]}, features=feats)
    dd = datasets.DatasetDict({"train": split(6, [(40, 30), (50, 50)]), "validation": split(2, [(20, 20)] * 2)})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: asked.append((repo, kw)) or dd)
    d = train_vit.load_hub("fgvc", 24)  # label column "variant", test falls back to the validation split
    assert asked == [("HuggingFaceM4/FGVC-Aircraft", {"revision": train_vit.DATASETS["fgvc"][2]})]  # parquet, pinned
    assert d["classes"] == ["a", "b", "c"] and d["y_train"].tolist() == [1, 2, 0, 1, 2, 0]
    assert d["x_train"].shape == (6, 3, 24, 24) and d["x_test"].shape == (2, 3, 20, 20)
    assert d["x_train"][3, 0].eq(30).all() and d["y_test"].tolist() == [1, 2]


def _vit_smoke_argv(tmp_path, method, *extra):
    npz = tmp_path / "data.npz"
    if not npz.exists():
        _vit_write_npz(str(npz))
    return ["--method", method, "--init_from", "scratch", "--depth", "1", "--dim", "64", "--heads", "2",
            "--patch_size", "4", "--image_size", "16", "--data", str(npz), "--max_iters", "3", "--batch_size", "4",
            "--eval_batch_size", "5", "--log_interval", "1", "--vblora_b", "32", "--lr", "1e-2",
            "--out_dir", str(tmp_path / "out"), "--device", "cpu", *extra]


@pytest.mark.parametrize("method", train_vit.ALL_METHODS)
def test_vit_smoke_every_method_trains_saves_and_reloads(tmp_path, capsys, method):
    res = train_vit.main(_vit_smoke_argv(tmp_path, method))
    out = capsys.readouterr().out
    assert "test accuracy" in out and 0.0 <= res["test_acc"] <= 1.0
    assert ("step 3/3" in out) == (method != "none")
    assert "trainable parameters without the head" in out
    model = res["model"].eval()
    path = tmp_path / "out" / "adapter.pt"
    assert path.exists() and (tmp_path / "out" / "ckpt.pt").exists()
    x = train_vit.preprocess(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), 16, train=False)
    reloaded = train_vit.load_finetuned(str(path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), atol=1e-5, rtol=1e-5)
        # the adapter matters: the same backbone with only the trained head gives other logits
        torch.manual_seed(0)
        bare = train_vit.build_model(train_vit.get_args(_vit_smoke_argv(tmp_path, "head")), 4)
        bare.head.load_state_dict(model.head.state_dict())
        differs = not torch.allclose(bare.eval()(x), model(x), atol=1e-6)
    assert differs == (method not in ("none", "head"))


def test_vit_resume_continues_from_the_checkpoint(tmp_path, capsys):
    train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--max_iters", "2"))
    capsys.readouterr()
    res = train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--max_iters", "3", "--resume"))
    out = capsys.readouterr().out
    assert "at step 2" in out and "step 3/3" in out and "step 1/" not in out
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3
    with pytest.raises(SystemExit):
        train_vit.main(_vit_smoke_argv(tmp_path, "sera", "--resume"))


def test_vit_bad_method_config_exits_with_the_constraint(tmp_path):
    with pytest.raises(SystemExit) as e:
        train_vit.main(_vit_smoke_argv(tmp_path, "vblora", "--vblora_b", "48"))
    assert "--method vblora" in str(e.value) and "48" in str(e.value)



class _VitStop(Exception):
    pass


def test_vit_resume_after_an_interruption_matches_a_straight_run(tmp_path, monkeypatch):
    # 16 images / batch 4: epoch 1 ends (and saves) at step 4 of 8; the augmentation draws from the global RNG
    argv = ["--max_iters", "8", "--min_crop", "0.3"]
    straight = train_vit.main(_vit_smoke_argv(tmp_path, "lora", *argv, "--out_dir", str(tmp_path / "a")))
    save_atomic, saved = train_vit.save_atomic, []

    def save_then_stop(obj, path):  # a run killed right after its first checkpoint
        save_atomic(obj, path)
        saved.append(path)
        if len(saved) == 2:
            raise _VitStop
    monkeypatch.setattr(train_vit, "save_atomic", save_then_stop)
    with pytest.raises(_VitStop):
        train_vit.main(_vit_smoke_argv(tmp_path, "lora", *argv, "--out_dir", str(tmp_path / "b")))
    monkeypatch.setattr(train_vit, "save_atomic", save_atomic)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 4
    train_vit.main(_vit_smoke_argv(tmp_path, "lora", *argv, "--out_dir", str(tmp_path / "b"), "--resume"))
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert straight["test_acc"] is not None


def test_vit_resume_refuses_other_trainables_and_other_optimizer_groups(tmp_path, capsys):
    train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--max_iters", "1"))
    with pytest.raises(SystemExit) as e:
        train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--targets", "q_proj", "--resume"))
    assert "only in the checkpoint" in str(e.value) and "v_proj.lora_A" in str(e.value)
    with pytest.raises(SystemExit) as e:
        train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--targets", "q_proj,k_proj,v_proj", "--resume"))
    assert "only in this run" in str(e.value) and "k_proj.lora_A" in str(e.value)
    with pytest.raises(SystemExit) as e:  # no decay anywhere: the head's weight and bias share one group
        train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--weight_decay", "0", "--resume"))
    assert "optimizer state" in str(e.value)
