"""The one test file: `pytest test_all.py`. Its sections, in this order, and the -k word that selects one:

1. the shared contract, every method from one METHODS table (zero start, targets, freezing, gradients, merge,
   save/load, refusals): -k contract;
2. one section per paper: formulas against independent references, float64 gradcheck, the papers' counts, init
   rules, helpers: -k "lora and not vblora", -k sera, -k siva, -k bone, -k vblora (each also selects the
   method's rows in the other sections);
3. kernels.py and bench.py: every op, forward and every gradient, against its reference (on the CPU under
   TRITON_INTERPRET=1), and an H100 compile of every kernel: -k kernel;
4. dispatch, how the method files hand over to kernels.py: -k dispatch;
5. GPT-2 on E2E: model_gpt2.py, e2e.py, train_gpt2.py, and common.py's fetching, runs and DDP: -k gpt2;
6. the ViT: model_vit.py, images.py, train_vit.py: -k vit;
7. interop.py: PEFT's folder format in and out, against PEFT itself, and the scripts' --export: -k peft;
8. beside the ecosystem: a user's clone, no triton, transformers and Hugging Face's `kernels`;
9. reproduce.py: -k reproduce.
"""
import os
# Kernel tests run on the CPU under Triton's interpreter (set before triton is imported), or compiled on a GPU
# with NANOPEFT_TEST_DEVICE=cuda (then TRITON_INTERPRET must stay unset).
KERNEL_DEVICE = os.environ.get("NANOPEFT_TEST_DEVICE", "cpu")
if KERNEL_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NANOPEFT_NO_TRITON", "1") # method tests use the reference path; kernel tests opt in
import argparse
import copy
import csv
import inspect
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import tiktoken
import tiktoken.load
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file


class _Unusable:
    """Stands in for a package that cannot be used here: touching any of its names skips the test, with why."""

    def __init__(self, why):
        self.why = why

    def __getattr__(self, name):
        if name.startswith("_") or name == "pytestmark":  # what pytest's collection asks of module globals
            raise AttributeError(name)
        pytest.skip(self.why)


try:  # the references interop is tested against; requirements.txt installs both
    import transformers
    if not transformers.is_torch_available():  # it refuses a torch older than it needs
        raise ImportError(f"transformers {transformers.__version__} does not use torch {torch.__version__}")
    import peft
    HF_UNUSABLE = None
except Exception as e:  # absent, or refused by this torch (the newest transformers needs a newer one)
    HF_UNUSABLE = f"transformers and PEFT are not usable here ({type(e).__name__}: {str(e)[:100]})"
    peft = transformers = _Unusable(HF_UNUSABLE)


def _needs_hf():
    if HF_UNUSABLE:
        pytest.skip(HF_UNUSABLE)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bone
import common
import e2e
import images
import interop
import kernels
import lora
import model_gpt2
import model_vit
import reproduce
import sera
import siva
import train_gpt2
import train_vit
import vblora
from vblora import (VBLoRABank, VBLoRAConfig, VBLoRALinear, apply_vblora, from_authors_state_dict,
                    load_vblora_state_dict, topk_admixture, vblora_param_count, vblora_state_dict,
                    vblora_stored_param_count, vector_usage)


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


# The kernels are tested under the interpreter of this triton and newer; older interpreters (triton 3.0, which
# torch 2.4's CUDA build pins) fail on plain loops over runtime sizes. Compiled, on a GPU, no such floor applies.
INTERPRETER_TESTED = (3, 9)


def _triton_version():
    import triton
    return tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])


@pytest.fixture
def kernel_device():
    """Tensors a kernel test creates land on KERNEL_DEVICE."""
    if not kernels.HAS_TRITON:
        pytest.skip("triton is not installed (Linux only): the kernels cannot run here")
    if KERNEL_DEVICE == "cpu" and _triton_version() < INTERPRETER_TESTED:
        pytest.skip(f"triton {'.'.join(map(str, _triton_version()))}'s interpreter is older than the one the kernels "
                    f"are tested under ({'.'.join(map(str, INTERPRETER_TESTED))}); on a GPU: NANOPEFT_TEST_DEVICE=cuda")
    torch.set_default_device(KERNEL_DEVICE)
    yield KERNEL_DEVICE
    torch.set_default_device("cpu")


# ================================================================================================
# The shared contract, every method (one table)
# ================================================================================================
# One row per method (Bone: one per grouping and variant): the names differ, the contract is the same. `cfg`
# suits the toy model below (every width a multiple of 4). VB-LoRA starts small but non-zero (its bank and logits
# are random): zero_start=False. `bad`: config values each refused with a ValueError naming the value.
def _row(name, mod, Config, Linear, apply, state_dict, load, cfg, bad=(), zero_start=True):
    return SimpleNamespace(name=name, mod=mod, Config=Config, Linear=Linear, apply=apply, state_dict=state_dict,
                           load=load, cfg=cfg, bad=list(bad), zero_start=zero_start)


_bone = lambda **cfg: _row("Bone", bone, bone.BoneConfig, bone.BoneLinear, bone.apply_bone, bone.bone_state_dict,
                           bone.load_bone_state_dict, dict(b=4, **cfg))
METHODS = {
    "lora": _row("LoRA", lora, lora.LoRAConfig, lora.LoRALinear, lora.apply_lora, lora.lora_state_dict,
                 lora.load_lora_state_dict, dict(r=3, alpha=5.0, dropout=0.0),
                 [dict(r=0), dict(r=2.0), dict(r=True), dict(alpha=-1.0), dict(alpha=float("nan")), dict(alpha=True),
                  dict(dropout=1.0), dict(dropout=-0.1), dict(dropout=False)]),
    "sera": _row("SeRA", sera, sera.SeRAConfig, sera.SeRALinear, sera.apply_sera, sera.sera_state_dict,
                 sera.load_sera_state_dict, dict(r=4, split=2, alpha=6.0),
                 [dict(r=4, split=3), dict(r=4.0), dict(split=1, r=0), dict(r=4, split=0), dict(r=4, split=2.0),
                  dict(alpha=-2.0), dict(alpha=float("inf")), dict(dropout=-0.1), dict(dropout=1.0)]),
    "siva": _row("SiVA", siva, siva.SiVAConfig, siva.SiVALinear, siva.apply_siva, siva.siva_state_dict,
                 siva.load_siva_state_dict, dict(perc=0.8),
                 [dict(perc=p) for p in (0.0, 1.0, 1.5, -0.1, float("nan"))]
                 + [dict(select="middle"), dict(basis="fourier"), dict(svd_dtype=torch.float16), dict(seed=0.5)]),
    "bone-col": _bone(grouping="col"),
    "bone-row": _bone(grouping="row"),
    "bone-col-hadamard": _bone(grouping="col", variant="hadamard"),
    "bone-col-unconstrained": _bone(grouping="col", variant="unconstrained"),
    "bone-row-unconstrained": _bone(grouping="row", variant="unconstrained"),
    "vblora": _row("VB-LoRA", vblora, vblora.VBLoRAConfig, vblora.VBLoRALinear, vblora.apply_vblora,
                   lambda m: vblora.vblora_state_dict(m, compact=False), vblora.load_vblora_state_dict,
                   dict(r=2, b=4, h=8, k=2), zero_start=False,
                   bad=[dict(r=0), dict(b=4.0), dict(h=True), dict(k=9), dict(r=True), dict(b=256.0), dict(h=2.5),
                        dict(k=False), dict(r=float("nan")), dict(init_logits_std=-0.01),
                        dict(init_logits_std=float("nan")), dict(init_logits_std=True), dict(init_bank_bound=0.0),
                        dict(init_bank_bound=-0.02), dict(init_bank_bound=float("inf"))]),
}
METHODS["bone-col"].bad = [dict(b=0), dict(b=-2), dict(b=4.0), dict(b=True), dict(b=float("nan")),
                           dict(grouping="diag"), dict(grouping=None), dict(variant="kron")]
_methods = pytest.mark.parametrize("method", list(METHODS))
ADAPTER_PREFIXES = ("lora_", "sera_", "siva_", "bone_", "vblora_")


class _Toy(nn.Module):
    """Three Linears (8 -> 12 -> 12 -> 8) and a LayerNorm: targets by name, a frozen non-Linear part."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2 = nn.Linear(8, 12), nn.Linear(12, 12), nn.Linear(12, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.l2(F.gelu(self.l1(F.gelu(self.l0(x))))))


def _toy(method, targets=("l0", "l2"), seed=0):
    torch.manual_seed(seed)
    model = _Toy().double()
    M = METHODS[method]
    M.apply(model, M.Config(**M.cfg), list(targets))
    return model


def _layers(model):
    return [m for m in model.modules() if hasattr(m, "base") and hasattr(m, "merged")]


def _randomize(model):
    """O(1) adapter tensors, so that every bug past a zero-initialised factor shows."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(part.startswith(ADAPTER_PREFIXES) for part in n.split(".")):
                p.normal_(0, 0.3)


def _adapter_names(model):
    return {n for n, _ in model.named_parameters() if any(part.startswith(ADAPTER_PREFIXES) for part in n.split("."))}


@_methods
def test_contract_zero_start(method):
    """The adapted model starts at the base model (SeRA, SiVA, Bone, LoRA); VB-LoRA's start is small, not zero."""
    torch.manual_seed(0)
    base = _Toy().double()
    model = _toy(method)
    x = torch.randn(5, 8, dtype=torch.float64)
    diff = (model(x) - base(x)).abs().max().item()
    dW = model.l0.delta_weight()
    assert dW.shape == model.l0.base.weight.shape
    if METHODS[method].zero_start:
        assert diff == 0.0 and torch.count_nonzero(dW) == 0
    else:
        assert 0.0 < diff < 0.05 and 0 < dW.abs().max() < 0.05


def _named_toy():
    """Names that a careless suffix match confuses: q_proj / xq_proj, attn.c_proj / mlp.c_proj, a LayerNorm q_proj."""
    blk = lambda: nn.ModuleDict(dict(
        attn=nn.ModuleDict(dict(q_proj=nn.Linear(8, 8), v_proj=nn.Linear(8, 8), c_proj=nn.Linear(8, 8),
                                xq_proj=nn.Linear(8, 8))),
        mlp=nn.ModuleDict(dict(c_proj=nn.Linear(8, 8))), ln=nn.LayerNorm(8)))
    return nn.ModuleDict(dict(h=nn.ModuleList([blk(), blk()]), q_proj=nn.LayerNorm(8), head=nn.Linear(8, 4))).double()


class _Block(nn.Module):
    """GPT-2-like block with separate q, k, v and two c_proj (attn and mlp): the per-paper sections' toy."""

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


class _Blocks(nn.Module):
    def __init__(self, d=16, f=32, n_layer=2, **kw):
        super().__init__()
        self.h = nn.ModuleList([_Block(d, f, **kw) for _ in range(n_layer)])
        self.head = nn.Linear(d, 5, **kw)

    def forward(self, x):
        for blk in self.h:
            x = blk(x)
        return self.head(x)


@_methods
def test_contract_targets_and_freezing(method):
    """A module named n is adapted iff it is an nn.Linear and n == t or n ends with "." + t; all else frozen.
    apply returns the adapted names in module order (VB-LoRA: its bank, which holds them)."""
    M = METHODS[method]
    model = _named_toy()
    names = M.apply(model, M.Config(**M.cfg), ["attn.c_proj", "q_proj"])
    names = names.adapted_names if method == "vblora" else names
    assert names == [f"h.{i}.attn.{m}" for i in range(2) for m in ("q_proj", "c_proj")]
    adapted = {n for n, m in model.named_modules() if isinstance(m, M.Linear)}
    assert adapted == set(names) == {n for n, m in model.named_modules() if hasattr(m, "merged")}
    expect = set(names)
    assert type(model.h[0].mlp.c_proj) is nn.Linear and type(model.h[1].attn.xq_proj) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == _adapter_names(model)
    assert all(n.startswith(tuple(expect)) or n.startswith("vblora_bank") for n in trainable)
    with pytest.raises(ValueError, match=r"'k_proj' matches no nn.Linear; some Linear names: \['h.0.attn.q_proj'"):
        M.apply(_named_toy(), M.Config(**M.cfg), ["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="'ln'"):  # matches only LayerNorms
        M.apply(_named_toy(), M.Config(**M.cfg), ["ln"])
    with pytest.raises(ValueError, match="'proj'"):  # whole name components only: "proj" is not "q_proj"
        M.apply(_named_toy(), M.Config(**M.cfg), ["proj"])
    one = _named_toy()  # one target as a plain string
    names = M.apply(one, M.Config(**M.cfg), "head")
    assert (names.adapted_names if method == "vblora" else names) == ["head"]


@_methods
def test_contract_gradients_reach_every_adapter_tensor_only(method):
    model = _toy(method)
    _randomize(model)
    model(torch.randn(4, 8, dtype=torch.float64)).square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@_methods
def test_contract_merge_round_trip(method):
    """merge(): the same outputs from W + ΔW alone, forward = base(x); unmerge(): W back; both idempotent."""
    model = _toy(method)
    _randomize(model)
    x = torch.randn(6, 8, dtype=torch.float64)
    y = model(x)
    W0 = {id(l): l.base.weight.detach().clone() for l in _layers(model)}
    dW = {id(l): l.delta_weight().detach().clone() for l in _layers(model)}
    for l in _layers(model):
        l.merge()
        assert l.merged
        assert_close(l.base.weight.detach(), W0[id(l)] + dW[id(l)])
        W1 = l.base.weight.detach().clone()
        l.merge()  # idempotent
        assert torch.equal(l.base.weight, W1)
    assert torch.equal(model.l0(x), model.l0.base(x))  # merged: forward = base(x)
    model.eval()
    assert all(l.merged for l in _layers(model))  # no auto-merge / unmerge on mode switches
    assert_close(model(x), y)
    for l in _layers(model):
        l.unmerge()
        assert not l.merged
        torch.testing.assert_close(l.base.weight.detach(), W0[id(l)], atol=1e-10, rtol=0)
        l.unmerge()  # idempotent
        torch.testing.assert_close(l.base.weight.detach(), W0[id(l)], atol=1e-10, rtol=0)
    assert_close(model(x), y)


@_methods
def test_contract_save_load_round_trip(method, tmp_path):
    M = METHODS[method]
    model = _toy(method)
    _randomize(model)
    x = torch.randn(6, 8, dtype=torch.float64)
    sd = M.state_dict(model)  # VB-LoRA: its full form (bank, logits); the compact default is tested there
    assert set(sd) == {n for n, p in model.named_parameters() if p.requires_grad}
    torch.save(sd, tmp_path / "a.pt")
    sd = torch.load(tmp_path / "a.pt", weights_only=True)
    fresh = _toy(method, seed=0)  # same base weights (SiVA rebuilds its basis from them), other adapter values
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert not torch.allclose(fresh(x), model(x))
    key = sorted(sd)[-1]
    with pytest.raises(ValueError, match=re.escape(key)):  # a missing key is named
        M.load(fresh, {n: t for n, t in sd.items() if n != key})
    with pytest.raises(ValueError, match="9.extra"):  # so is an unexpected one
        M.load(fresh, {**sd, "9.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape|k="):
        M.load(fresh, {**sd, key: torch.zeros(1, dtype=sd[key].dtype)})
    M.load(fresh, sd)
    assert_close(fresh(x), model(x))


@_methods
def test_contract_empty_targets_raise(method):
    M = METHODS[method]
    model = _Toy().double()
    with pytest.raises(ValueError, match=f"{M.name}: targets is empty"):
        M.apply(model, M.Config(**M.cfg), [])
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen on the way


@pytest.mark.parametrize("first, second", [(m, "lora") for m in METHODS] + [("lora", m) for m in METHODS]
                         + [("bone-col", "bone-row")])
def test_contract_second_apply_keeps_the_first_adapter(first, second):
    """Applying methods one after another leaves the earlier adapters as they were."""
    model = _toy(first, targets=["l0"])
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    M = METHODS[second]
    M.apply(model, M.Config(**M.cfg), ["l2"])
    after = {n for n, p in model.named_parameters() if p.requires_grad}
    assert before and before < after
    assert any(n.startswith("l0.") for n in after) and any(n.startswith("l2.") for n in after)


@_methods
def test_contract_refuses_multihead_attention_out_proj(method):
    """Nn.MultiheadAttention reads out_proj.weight itself; an adapter there would be bypassed."""
    M = METHODS[method]
    model = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0)
    with pytest.raises(ValueError, match="cannot adapt 'self_attn.out_proj': nn.MultiheadAttention"):
        M.apply(model, M.Config(**M.cfg), ["out_proj", "linear1"])
    assert type(model.linear1) is nn.Linear and not hasattr(model, "vblora_bank")  # checked before any swap
    assert all(p.requires_grad for p in model.parameters())


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
        self.head.weight = self.emb.weight  # tied, as GPT-2's lm_head and embedding

    def forward(self, x):
        return self.head(self.emb(x))


@_methods
def test_contract_merge_refuses_a_tied_weight(method):
    """Merging into a weight shared with another module would rewrite that module too."""
    torch.manual_seed(0)
    model = _Tied().double()
    M = METHODS[method]
    M.apply(model, M.Config(**M.cfg), ["head"])
    _randomize(model)
    assert model.head.tied_to == ["emb.weight"]
    W = model.emb.weight.detach().clone()
    with pytest.raises(ValueError, match=r"\['emb.weight'\] \(tied\).*Untie first"):
        model.head.merge()
    assert torch.equal(model.emb.weight, W) and not model.head.merged


@pytest.mark.parametrize("method, bad", [(m, b) for m, M in METHODS.items() for b in M.bad])
def test_contract_bad_config_values_name_the_value(method, bad):
    """Non-integer sizes, negative or NaN scales: a ValueError naming the value."""
    M = METHODS[method]
    key, value = list(bad.items())[-1]  # the offending field is the last one given
    with pytest.raises(ValueError, match=re.escape(f"{M.name}: {key}={value!r}")):
        M.Config(**{**M.cfg, **bad})


@_methods
def test_contract_load_checks_everything_before_writing(method):
    """A non-finite tensor is refused, and nothing of the adapter was overwritten."""
    model = _toy(method)
    _randomize(model)
    sd = {n: t.clone() for n, t in METHODS[method].state_dict(model).items()}
    first, last = sorted(sd)[0], sorted(sd)[-1]
    sd[first].add_(1.0)  # a valid change written first, if the loader wrote before checking
    sd[last].view(-1)[0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="finite|NaN"):
        METHODS[method].load(model, sd)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


@_methods
def test_contract_load_into_a_merged_model_is_refused(method):
    """Loading under a merged W makes a later unmerge() subtract the wrong ΔW."""
    model = _toy(method)
    _randomize(model)
    sd = METHODS[method].state_dict(model)
    W0 = model.l0.base.weight.detach().clone()
    model.l0.merge()
    with pytest.raises(ValueError, match="merged"):
        METHODS[method].load(model, sd)
    model.l0.unmerge()  # W comes back: the load wrote nothing while the layer held the old ΔW
    assert_close(model.l0.base.weight, W0)


# ================================================================================================
# LoRA and SeRA (one family, x A (C) B: the tests below run both, from their METHODS rows)
# ================================================================================================
_sera_lora_names = pytest.mark.parametrize("name", ["lora", "sera"])
_SERA_LORA_TRAINABLE = {"lora": ("lora_A", "lora_B"), "sera": ("sera_A", "sera_C", "sera_B")}


def _sera_lora_layer(name, d_in=12, d_out=10, dtype=torch.float32, randomize=True, **over):
    M = METHODS[name]  # its cfg suits layers whose in/out features are even (SeRA's split=2 must divide them)
    cfg = M.Config(**{**M.cfg, **over})
    layer = M.Linear(nn.Linear(d_in, d_out, dtype=dtype), cfg)
    if randomize:  # B = 0 at init would hide every bug past A; give all adapter tensors O(1) values
        with torch.no_grad():
            for n in _SERA_LORA_TRAINABLE[name]:
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
    assert_close(y, ref)


@_sera_lora_names
def test_sera_lora_gradcheck_every_trainable(name):
    trainable = _SERA_LORA_TRAINABLE[name]
    layer, _ = _sera_lora_layer(name, d_in=6, d_out=4, dtype=torch.float64)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == set(trainable)
    params = tuple(getattr(layer, n).detach().clone().requires_grad_() for n in trainable)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    f = lambda x, *ps: torch.func.functional_call(layer, dict(zip(trainable, ps)), (x,))
    assert torch.autograd.gradcheck(f, (x, *params))
    layer(x).square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert all(getattr(layer, n).grad.abs().sum() > 0 for n in trainable)


@pytest.mark.parametrize("r, split", [(4, 4), (4, 2)])  # r/split = 1 (the default) and 2
def test_sera_forward_and_grads_match_block_diag_reference(r, split):
    """The segment-wise forward and its gradients vs autograd through the dense paper formula, float64."""
    s, d_in, d_out, scale = split, 8, 12, 0.7
    layer = sera.SeRALinear(nn.Linear(d_in, d_out, dtype=torch.float64),
                            sera.SeRAConfig(r=r, split=split, alpha=scale * r))
    with torch.no_grad():
        for t in (layer.sera_A, layer.sera_C, layer.sera_B):
            t.normal_()
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    A, C, B = layer.sera_A, layer.sera_C, layer.sera_B
    ins = (x, A, C, B)
    g = torch.randn(3, 2, d_out, dtype=torch.float64).transpose(0, 1)  # a non-contiguous upstream gradient
    W, bias = layer.base.weight, layer.base.bias
    ref = F.linear(x, W, bias) + scale * (x @ torch.block_diag(*A.unbind(0)) @ C @ torch.block_diag(*B.unbind(0)))
    ref_grads = torch.autograd.grad(ref, ins, g)
    out = layer(x)
    assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, ins, g), ref_grads):
        assert_close(got, want)
    assert torch.autograd.gradcheck(lambda *t: layer(t[0]), ins)


@_sera_lora_names
def test_sera_lora_dropout_only_on_adapter_input(name):
    layer, cfg = _sera_lora_layer(name, dropout=0.5)
    x = torch.randn(4, 12)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = F.dropout(x, 0.5, training=True)
    ref = F.linear(x, layer.base.weight, layer.base.bias) + _sera_lora_ref_delta(name, layer, cfg, xd)
    assert_close(y, ref)
    layer.eval()
    ref = F.linear(x, layer.base.weight, layer.base.bias) + _sera_lora_ref_delta(name, layer, cfg, x)
    assert_close(layer(x), ref)


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
    layer, cfg = _sera_lora_layer(name)
    seen = []

    def applies(*ts):
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

    fake = SimpleNamespace(applies=applies, sera_delta=sera_delta, lowrank_add=lowrank_add,
                           lowrank_linear=lowrank_linear)
    monkeypatch.setattr(sera if name == "sera" else lora, "_kernels", fake)
    x = torch.randn(2, 3, 12)
    ref = F.linear(x, layer.base.weight, layer.base.bias) + _sera_lora_ref_delta(name, layer, cfg, x)
    assert_close(layer(x), ref)
    assert len(seen) == 1 and torch.equal(seen[0].reshape(x.shape), x)  # no dropout in `small`: x reaches it
    layer.merge()
    layer(x)
    assert len(seen) == 1  # merged: base only, no kernel


@_sera_lora_names
def test_sera_lora_init_kaiming_bounds(name):
    """kaiming_uniform_(a=sqrt(5)) is U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2))."""
    d_in, r = 2048, 32
    layer, _ = _sera_lora_layer(name, d_in=d_in, d_out=64, randomize=False, r=r)
    if name == "sera":  # split = 2: each A_i sees in/2 inputs, C sees r
        checks = [(layer.sera_A, d_in // 2), (layer.sera_C, r)]
    else:
        checks = [(layer.lora_A, d_in)]
    assert torch.count_nonzero(getattr(layer, f"{name}_B")) == 0  # B = 0: ΔW = 0 at init
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))
    for t, fan_in in checks:
        b = gain * math.sqrt(3 / fan_in)
        assert t.abs().max() <= b
        assert t.abs().max() > 0.95 * b  # 1000+ draws come near the edge; a wrong fan-in's bound is >= 1.4x off
        assert abs(t.mean().item()) < 0.1 * b
        assert abs(t.std().item() / (b / math.sqrt(3)) - 1) < 0.05


# ---------------------------------------------------------------- merge

@_sera_lora_names
def test_sera_lora_delta_weight_matches_dense_formula(name):
    layer, cfg = _sera_lora_layer(name)
    ref_dW = _sera_lora_ref_dW(name, layer, cfg)
    torch.testing.assert_close(layer.delta_weight().double(), ref_dW, rtol=1e-5, atol=1e-6)


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
    M = METHODS[name]
    cfg = sera.SeRAConfig(r=r, split=split) if name == "sera" else lora.LoRAConfig(r=r)
    closed = (d_in + d_out) * r / split + r * r if name == "sera" else r * (d_in + d_out)
    layer = M.Linear(nn.Linear(d_in, d_out, device="meta"), cfg)
    assert _sera_lora_trainable(layer) == getattr(M.mod, f"{name}_param_count")(d_in, d_out, cfg) == closed


def _sera_lora_clip_base():
    return nn.ModuleDict(dict(text=_sera_lora_encoder(12, 512), vision=_sera_lora_encoder(12, 768)))


@pytest.mark.parametrize("model_fn,r,expect", [
    (_sera_lora_clip_base, 8, 64_512),  # SeRA Table 1, "0.064M"
    (lambda: _sera_lora_encoder(24, 1024), 8, 101_376),  # SeRA Table 3, RoBERTa-large "0.1M"
    (lambda: _sera_lora_encoder(24, 1024), 16, 110_592),  # SeRA Table 3, "0.11M"
])
def test_sera_paper_counts(model_fn, r, expect):
    model = model_fn()
    names = sera.apply_sera(model, sera.SeRAConfig(r=r), ["q_proj", "v_proj"])  # split follows r
    assert len(names) == 48  # q and v of 24 layers
    assert _sera_lora_trainable(model) == expect


def test_sera_split_defaults_to_r():
    """The paper's default is split = r, so changing r alone moves split with it."""
    assert sera.SeRAConfig(r=16).split == 16 and sera.SeRAConfig().split == sera.SeRAConfig().r == 8
    assert sera.SeRAConfig(r=16, split=4).split == 4


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
    assert_close(layer.delta_weight(), dW)
    ref = base(x).double() + x.double() @ dW.T
    assert_close(y, ref)


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
    x = torch.randn(2, 5, 48)  # zero start whichever pairs are kept
    assert torch.equal(top(x), base(x)) and torch.count_nonzero(top.delta_weight()) == 0


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
    assert torch.equal(a(x), base(x)) and torch.count_nonzero(a.delta_weight()) == 0  # zero start


def test_siva_state_dict_save_load_round_trip():
    base_model = _Blocks(d=32, f=48, n_layer=1)
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
    model = _Blocks(d=32, f=48, n_layer=1)
    siva.apply_siva(model, siva.SiVAConfig(), ["q", "mlp.c_proj"])
    sd = siva.siva_state_dict(model)
    assert sd and all(n.endswith(".siva_s") for n in sd)
    assert sum(t.numel() for t in sd.values()) == sum(m.k for m in model.modules() if isinstance(m, siva.SiVALinear))
    assert not any("siva_U" in n or "siva_V" in n for n in model.state_dict())  # buffers are non-persistent


def test_siva_refuses_other_k_and_a_meta_base():
    base_model = _Blocks(d=32, f=48, n_layer=1)
    model = copy.deepcopy(base_model)
    siva.apply_siva(model, siva.SiVAConfig(perc=0.95), ["attn.q"])
    other = copy.deepcopy(base_model)
    siva.apply_siva(other, siva.SiVAConfig(perc=0.6), ["attn.q"])
    k_saved, k_other = model.h[0].attn.q.k, other.h[0].attn.q.k
    assert k_saved != k_other
    with pytest.raises(ValueError, match=rf"attn\.q.*k={k_saved}.*k={k_other}"):
        siva.load_siva_state_dict(other, siva.siva_state_dict(model))
    with pytest.raises(ValueError, match="missing"):
        siva.load_siva_state_dict(other, {})
    with pytest.raises(ValueError, match="meta"):  # the basis is an SVD of W: W must hold values
        siva.SiVALinear(nn.Linear(8, 8, device="meta"), siva.SiVAConfig())


def test_siva_param_counts():
    model = _Blocks(d=32, f=48, n_layer=1)
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


def test_siva_kernel_path_arguments(monkeypatch):
    """The kernel branch must call lowrank_linear(x, W, bias, A=siva_V, B=siva_U, d=siva_s, 1.0); a stand-in
    with the documented semantics catches a wrong order on a non-square layer."""
    fake = types.SimpleNamespace(
        applies=lambda *t: True,
        lowrank_linear=lambda x, W, bias, A, B, d=None, scale=1.0:
            F.linear(x, W, bias) + scale * ((x @ A.T) * d) @ B.T)
    monkeypatch.setattr(siva, "_kernels", fake)
    base = nn.Linear(48, 80)
    layer = siva.SiVALinear(copy.deepcopy(base), siva.SiVAConfig(perc=0.8))
    with torch.no_grad():
        layer.siva_s.normal_()
    x = torch.randn(2, 3, 48)
    ref = base(x).double() + x.double() @ _siva_ref_delta(base.weight, layer.k, layer.siva_s).T
    assert_close(layer(x), ref)


# ================================================================================================
# Bone
# ================================================================================================
# every (grouping, variant) pair the config accepts
_BONE_KINDS = [("col", "bone"), ("row", "bone"), ("col", "unconstrained"), ("row", "unconstrained"),
               ("col", "hadamard")]


def _bone_ref_weight(W, B, b, grouping, variant):
    """Independent reference: W' built block by block with Python loops, straight from the Weight Guide W'_ij = W_ij + W_ij B + B."""
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


@pytest.mark.parametrize("grouping,variant", _BONE_KINDS)
def test_bone_forward_matches_block_loop_reference(grouping, variant):
    layer = _bone_layer(grouping=grouping, variant=variant, dtype=torch.float64)
    assert layer.bone_B.shape == ((8 if grouping == "col" else 12) // 4, 4, 4)  # one b x b block per group
    Wp = _bone_ref_weight(layer.base.weight, layer.bone_B, 4, grouping, variant)
    for lead in [(5,), (2, 3)]:
        x = torch.randn(*lead, 12, dtype=torch.float64)
        assert_close(layer(x), x @ Wp.T + layer.base.bias)
    assert_close(layer.delta_weight(), Wp - layer.base.weight)


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
def test_bone_merge_writes_the_block_loop_weight(grouping, variant):
    """The round trip is in the contract; here: the merged W is the loop reference's W', ΔW needs W back, and
    a singular I + B_g cannot be unmerged."""
    layer = _bone_layer(d_in=16, d_out=8, grouping=grouping, variant=variant, dtype=torch.float64, scale=0.1)
    W0 = layer.base.weight.detach().clone()
    layer.merge()
    assert_close(layer.base.weight, _bone_ref_weight(W0, layer.bone_B, 4, grouping, variant))
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.delta_weight()
    if variant == "bone":
        layer = _bone_layer(grouping=grouping)
        with torch.no_grad():
            layer.bone_B[1] = -torch.eye(4)  # I + B_1 = 0
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


@pytest.mark.parametrize("grouping,variant", [("col", "bone"), ("col", "hadamard"), ("row", "bone")])
def test_bone_saves_no_dense_weight_prime(grouping, variant):
    layer = _bone_layer(d_in=16, d_out=24, grouping=grouping, variant=variant)
    x = torch.randn(5, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    W = layer.base.weight
    if grouping == "col":  # the hook sees what the Function keeps: W itself, not W'
        assert any(t.data_ptr() == W.data_ptr() for t in saved)
    assert [t for t in saved if t.numel() == W.numel() and t.data_ptr() != W.data_ptr()] == []
    y.sum().backward()
    assert layer.bone_B.grad is not None and x.grad is not None and W.grad is None


class _BoneStubKernels:
    """Stands in for kernels.py with the documented API, to check how BoneLinear uses the Triton ops."""
    @staticmethod
    def applies(*tensors):
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
    assert_close(layer(x), ref)


def test_bone_weight_guide_norms():
    model = _toy("bone-col", targets=["l0"])
    _randomize(model)
    layer = model.l0
    W, B = layer.base.weight, layer.bone_B
    guide = _bone_ref_weight(W, B, 4, "col", "bone") - _bone_ref_weight(W, B, 4, "col", "unconstrained")
    tile = _bone_ref_weight(W, B, 4, "col", "unconstrained") - W
    r = bone.bone_weight_guide_norms(model)["l0"]
    assert math.isclose(r["guide"], guide.norm().item(), rel_tol=1e-4)
    assert math.isclose(r["tile"], tile.norm().item(), rel_tol=1e-4)
    assert math.isclose(r["delta"], (guide + tile).norm().item(), rel_tol=1e-4)


def _bone_row_call(layer, x, W, B, bias):
    """BoneLinear(grouping="row")'s forward with W, B and bias passed in, so gradcheck and autograd see them."""
    params = {"base.weight": W, "bone_B": B, **({"base.bias": bias} if bias is not None else {})}
    return torch.func.functional_call(layer, params, (x,))


def test_bone_row_gradcheck_all_inputs():
    layer = _bone_layer(d_in=12, d_out=8, grouping="row", dtype=torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    W = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    B = (0.3 * torch.randn(3, 4, 4, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _bone_row_call(layer, *a), (x, W, B, bias))


@pytest.mark.parametrize("with_bias", [True, False])
def test_bone_row_matches_block_loop_reference(with_bias):
    layer = bone.BoneLinear(nn.Linear(16, 24, bias=with_bias, dtype=torch.float64),
                            bone.BoneConfig(b=4, grouping="row"))
    x = torch.randn(4, 2, 16, dtype=torch.float64, requires_grad=True)
    W = torch.randn(24, 16, dtype=torch.float64, requires_grad=True)
    B = (0.3 * torch.randn(4, 4, 4, dtype=torch.float64)).requires_grad_(True)
    bias = torch.randn(24, dtype=torch.float64, requires_grad=True) if with_bias else None
    g = torch.randn(4, 2, 24, dtype=torch.float64)
    ins = (x, W, B) + ((bias,) if with_bias else ())
    y = _bone_row_call(layer, x, W, B, bias)
    ref_y = x @ _bone_ref_weight(W, B, 4, "row", "bone").T + (bias if with_bias else 0)
    assert_close(y, ref_y)
    ours = torch.autograd.grad(y, ins, g)
    for a, r in zip(ours, torch.autograd.grad(ref_y, ins, g)):
        assert_close(a, r)
    assert ours[0].is_contiguous()   # dx flows into the previous layer; strided grads slow its backward


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
_VB_TARGETS = ["q", "k", "v", "c_proj", "c_fc"]


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
    torch.testing.assert_close(topk_admixture(logits, bank, k), _vb_loop_compose(logits, bank, k))


@pytest.mark.parametrize("k", [2, 3])
def test_vblora_gradcheck_compose(k):
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda l, v: topk_admixture(l, v, k), (logits, bank))


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
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_vblora_layout_and_forward_vs_hand():
    model = _Blocks()
    bank = apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model)
    x = torch.randn(4, 32)
    for layer in (model.h[0].mlp.c_fc, model.h[1].mlp.c_proj, model.h[0].attn.q):
        A, B = _vb_hand_AB(layer, bank.vectors.detach())
        torch.testing.assert_close(layer.delta_weight(), B @ A)
        xi = x[:, :layer.in_features]
        torch.testing.assert_close(layer(xi), layer.base(xi) + xi @ (B @ A).T)
    layer = model.h[0].mlp.c_fc  # 3-D input: the same rows as 2-D
    x3 = torch.randn(2, 3, 16)
    y3, y2 = layer(x3), layer(x3.reshape(6, 16))
    assert y3.shape == (2, 3, 32) and y2.shape == (6, 32)
    torch.testing.assert_close(y3.reshape(6, 32), y2)
    assert model(x3).shape == (2, 3, 5)
    assert layer.delta_weight().shape == (32, 16)


def test_vblora_init_small_but_nonzero():
    base = _Blocks()
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
    model = _Blocks()
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
    model = _Blocks(d=d, f=f, n_layer=n_layer, device="meta")
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
    model = _Blocks()
    bank = apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    assert model.vblora_bank is bank
    assert sum(p is bank.vectors for p in model.parameters()) == 1
    assert [k for k in model.state_dict() if "vectors" in k] == ["vblora_bank.vectors"]
    layers = [m for m in model.modules() if isinstance(m, VBLoRALinear)]
    assert all(l.bank is bank for l in layers) and bank.layers == layers
    assert all("vectors" not in k for l in layers for k in l.state_dict())
    assert len(bank.adapted_names) == 12 and bank.adapted_names[0] == "h.0.attn.q"
    with pytest.raises(ValueError, match="already has a vblora_bank"):  # one bank per model
        apply_vblora(model, _vb_cfg(), ["k"])


def test_vblora_constraint_errors():
    with pytest.raises(ValueError, match=r"VB-LoRA: k=300 must be <= h=256"):
        VBLoRAConfig(k=300)
    for field in ("r", "k", "b", "h"):
        with pytest.raises(ValueError, match=rf"VB-LoRA: {field}=0 must be an int >= 1"):
            VBLoRAConfig(**{field: 0})
    cfg = _vb_cfg()
    bank = VBLoRABank(cfg)
    with pytest.raises(ValueError, match=r"b=8 must divide in_features=12"):
        VBLoRALinear(nn.Linear(12, 16), cfg, bank)
    with pytest.raises(ValueError, match=r"b=8 must divide out_features=20"):
        VBLoRALinear(nn.Linear(16, 20), cfg, bank)
    with pytest.raises(ValueError, match=r"do not match"):
        VBLoRALinear(nn.Linear(16, 16), _vb_cfg(h=7), bank)
    model = _Blocks(d=16, f=36)
    with pytest.raises(ValueError, match=r"b=8 must divide out_features=36"):
        apply_vblora(model, cfg, _VB_TARGETS)
    assert not hasattr(model, "vblora_bank") and isinstance(model.h[0].attn.q, nn.Linear)
    VBLoRAConfig(init_logits_std=0.0)  # all-equal logits are a valid (tied) start


def test_vblora_compact_save_load():
    """The default file: top-k indices (uint8) and k-1 weights per sub-vector, no logits (the full form, logits
    and bank, is in the contract)."""
    base = _Blocks()
    model = copy.deepcopy(base)
    apply_vblora(model, _vb_cfg(k=3), _VB_TARGETS)
    _vb_spread(model)
    with torch.no_grad():
        model.vblora_bank.vectors.normal_(0, 0.1)
    x = torch.randn(4, 16)
    buf = io.BytesIO()
    torch.save(vblora_state_dict(model), buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert all("vblora" in k for k in loaded) and not any("logits" in k for k in loaded)
    assert len([k for k in loaded if k.endswith("vblora_idx_A")]) == 12
    fresh = copy.deepcopy(base)
    torch.manual_seed(1)
    apply_vblora(fresh, _vb_cfg(k=3), _VB_TARGETS)
    assert not torch.allclose(fresh(x), model(x))
    load_vblora_state_dict(fresh, loaded)
    q = loaded["h.0.attn.q.vblora_idx_A"]
    assert q.dtype == torch.uint8 and q.shape == (2, 2, 3)
    assert loaded["h.0.attn.q.vblora_w_A"].shape == (2, 2, 2)  # k-1 weights
    for a, b in zip(model.modules(), fresh.modules()):
        if isinstance(a, VBLoRALinear):
            torch.testing.assert_close(b.delta_weight(), a.delta_weight(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-6)


def test_vblora_index_dtype_and_bad_load():
    model = nn.Sequential(nn.Linear(8, 8))
    apply_vblora(model, VBLoRAConfig(r=1, b=4, h=300, k=2), ["0"])
    sd = vblora_state_dict(model)
    assert sd["0.vblora_idx_A"].dtype == torch.uint16
    assert vblora_stored_param_count(model) == 300 * 4 + 4 + 4 * 2  # S=4; the paper counts 4 bytes for h > 256
    other = nn.Sequential(nn.Linear(8, 8))
    apply_vblora(other, VBLoRAConfig(r=1, b=4, h=300, k=3), ["0"])
    with pytest.raises(ValueError, match="shape"):
        load_vblora_state_dict(other, sd)
    with pytest.raises(ValueError, match="missing"):
        load_vblora_state_dict(model, {"vblora_bank.vectors": sd["vblora_bank.vectors"]})


def test_vblora_vector_usage():
    model = _Blocks()
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
    ref = vblora.topk_admixture

    def counted(logits, bank, k):
        calls.append(logits.shape[0])
        return ref(logits, bank, k)

    monkeypatch.setattr(vblora, "topk_admixture", counted)
    return calls


def test_vblora_one_compose_per_forward(monkeypatch):
    calls = _vb_counting(monkeypatch)
    model = _Blocks()
    apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    layers = [m for m in model.modules() if isinstance(m, VBLoRALinear)]
    x = torch.randn(3, 16)
    with torch.no_grad():
        y1 = model(x)
        assert calls == [2 * (4 * 2 * 4 + 2 * 2 * 6)]  # every layer's sub-vectors in one call
        y2 = model(x)
        assert len(calls) == 2 and torch.equal(y1, y2)  # every forward composes afresh, to the same result
    assert all(l.composed is None for l in layers)  # nothing outlives the model's forward
    model(x).sum().backward()
    assert len(calls) == 3
    with torch.no_grad():
        model.h[1].mlp.c_fc.vblora_logits_B.add_(1.0)
        model(x)
    assert len(calls) == 4
    layer = model.h[0].mlp.c_fc  # called on its own: composes its own A, B only
    layer(x)
    assert calls[-1] == 2 * 2 + 4 * 2 and len(calls) == 5
    model.h[0].attn.q.merge()  # a merged layer needs no composition
    with torch.no_grad():
        model(x)
    assert calls[-1] == calls[0] - 2 * (2 + 2)
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 7))  # a forward that raises still takes its compositions back
    assert all(l.composed is None for l in layers)


def test_vblora_grad_accumulation(monkeypatch):
    calls = _vb_counting(monkeypatch)
    model = _Blocks()
    apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model)
    x = torch.randn(3, 16)
    params = [p for p in model.parameters() if p.requires_grad]
    model(x).square().mean().backward()
    g1 = [p.grad.clone() for p in params]
    model.zero_grad()
    losses = [model(x).square().mean() for _ in range(2)]  # two forwards, then one backward each
    for loss in losses:
        loss.backward()
    assert len(calls) == 3
    for p, g in zip(params, g1):
        assert_close(p.grad, 2 * g)


def test_vblora_step_changes_output(monkeypatch):
    calls = _vb_counting(monkeypatch)
    model = _Blocks()
    apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model, std=0.1)
    x = torch.randn(3, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    with torch.no_grad():
        y0 = model(x)
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        y1 = model(x)
        y1_again = model(x)
    assert len(calls) == 4
    assert not torch.allclose(y0, y1)
    assert torch.equal(y1, y1_again)
    assert_close(copy.deepcopy(model)(x), model(x))  # the copy carries its own hooks, on its own bank
    assert torch.equal(vblora_state_dict(copy.deepcopy(model))["vblora_bank.vectors"], model.vblora_bank.vectors)


def test_vblora_kernel_dispatch(monkeypatch):
    # stand-in kernels module: checks the Triton path's calls and arguments, computes with references
    seen = []

    class _VBFakeKernels:
        @staticmethod
        def applies(*ts):
            return True

        @staticmethod
        def vblora_compose(logits, bank, k):
            seen.append(("compose", tuple(logits.shape), bank is model.vblora_bank.vectors, k))
            return _vb_loop_compose(logits, bank, k)

        @staticmethod
        def lowrank_linear(x, W, bias, A, B, d, scale):
            seen.append(("lowrank", tuple(A.shape), tuple(B.shape), d, scale))
            return F.linear(x, W, bias) + (x @ A.T) @ B.T

    model = _Blocks()
    apply_vblora(model, _vb_cfg(), _VB_TARGETS)
    _vb_spread(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
        monkeypatch.setattr(vblora, "_kernels", _VBFakeKernels)
        out = model(x)
    assert_close(out, ref)
    assert seen[0] == ("compose", (2 * (4 * 2 * 4 + 2 * 2 * 6), 6), True, 2)
    assert ("lowrank", (2, 16), (32, 2), None, 1.0) in seen and len(seen) == 1 + 12


def test_vblora_autocast_and_data_writes():
    """A bf16-autocast forward leaves nothing behind for an fp32 forward, and an optimizer step that writes
    through .data (as fused AdamW does, without bumping _version) changes the next output."""
    net = nn.Sequential(nn.Linear(32, 32))
    vblora.apply_vblora(net, vblora.VBLoRAConfig(r=2, b=16, h=8, k=2), ["0"])
    x = torch.randn(3, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(x).dtype == torch.bfloat16
    with torch.no_grad():
        y = net(x)
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
        again = net(x)
    assert not torch.allclose(before, after)
    assert torch.equal(after, again)


# ---------------------------------------------------------------- VB-LoRA at LLM scale, its layouts and bad input


def _vb_meta_llm(n_layer, d, qo, kv, ffn, cfg):
    """A Llama-shaped stack on the meta device: q, k, v, o projections and a gated MLP (gate, up, down)."""
    shapes = dict(q_proj=(d, qo), k_proj=(d, kv), v_proj=(d, kv), o_proj=(qo, d),
                  gate_proj=(d, ffn), up_proj=(d, ffn), down_proj=(ffn, d))
    model = nn.ModuleList(nn.ModuleDict({n: nn.Linear(i, o, device="meta") for n, (i, o) in shapes.items()})
                          for _ in range(n_layer))
    apply_vblora(model, cfg, list(shapes))  # all linear layers (the authors' find_all_linear_names, no lm_head)
    return model


def test_vblora_paper_counts_4byte_indices():
    # GPT-2 Large, E2E (Table 2 "0.13M"; Sec. 4.2: h=350, b=256, r=4): 36 layers, d=1280, fc 5120
    large = _vb_paper_model(36, 1280, 5120, _VB_TARGETS, VBLoRAConfig(r=4, b=256, h=350, k=2))
    assert vblora_stored_param_count(large) == 128_480  # 2-byte indices would give 115,520
    assert vblora_state_dict(large)["h.0.attn.q.vblora_idx_A"].dtype == torch.uint16  # the file is smaller
    # Table 4: h=2048, b=256, r=4, all linear layers but lm_head (the authors' math_instruction_tuning code)
    cfg = VBLoRAConfig(r=4, b=256, h=2048, k=2)
    mistral = _vb_meta_llm(32, 4096, 4096, 1024, 14336, cfg)  # Mistral-7B: GQA, 8 kv heads x 128
    assert vblora_stored_param_count(mistral) == 647_168 and round(647_168 / 1e6, 2) == 0.65
    gemma = _vb_meta_llm(28, 3072, 4096, 4096, 24576, cfg)  # Gemma-7B: 16 heads x 256 for q, k, v, o
    assert vblora_stored_param_count(gemma) == 670_784 and round(670_784 / 1e6, 2) == 0.67


def test_vblora_load_checks_everything_before_writing():
    model = _Blocks()
    apply_vblora(model, _vb_cfg(k=3), _VB_TARGETS)
    good = vblora_state_dict(model)
    good["vblora_bank.vectors"] = good["vblora_bank.vectors"] + 1.0  # so an early write would show
    before = {n: t.clone() for n, t in vblora_state_dict(model, compact=False).items()}

    def bad(key, value):
        return {**good, key: value}

    q = "h.1.mlp.c_proj."
    cases = [
        (bad(q + "vblora_idx_B", good[q + "vblora_idx_B"].long().fill_(6)), r"outside \[0, h=6\)"),
        (bad(q + "vblora_idx_B", good[q + "vblora_idx_B"].long() - 1), r"outside \[0, h=6\)"),
        (bad(q + "vblora_idx_B", good[q + "vblora_idx_B"].float()), "integer"),
        (bad(q + "vblora_w_A", good[q + "vblora_w_A"] + 1.0), r"outside \[0, 1\]"),
        (bad(q + "vblora_w_A", torch.full_like(good[q + "vblora_w_A"], 0.6)), "sum above 1"),  # k - 1 = 2 weights
        (bad(q + "vblora_w_A", good[q + "vblora_w_A"] * float("nan")), "non-finite"),
        (bad("vblora_bank.vectors", torch.full((6, 8), float("inf"))), "non-finite"),
    ]
    full = vblora_state_dict(model, compact=False)
    full[q + "vblora_logits_A"] = full[q + "vblora_logits_A"].clone().fill_(float("nan"))
    full["vblora_bank.vectors"] = full["vblora_bank.vectors"] + 1.0
    cases.append((full, "non-finite"))
    for sd, msg in cases:
        with pytest.raises(ValueError, match=msg):
            load_vblora_state_dict(model, sd)
        for n, t in vblora_state_dict(model, compact=False).items():
            assert torch.equal(t, before[n]), n  # nothing was written
    load_vblora_state_dict(model, good)
    assert torch.equal(model.vblora_bank.vectors, good["vblora_bank.vectors"])
    full_again = vblora_state_dict(model, compact=False)  # logits from a compact load are finite: reloadable
    load_vblora_state_dict(model, full_again)


def _vb_authors_forward(x, W, bias, bank, la_theirs, lb, k):
    """The authors' NLU VBLinear: logits_A (in/b, r, h), A (in, r), B (r, out), y = x W^T + b + x A B."""
    r = la_theirs.shape[1]
    A = topk_admixture(la_theirs.reshape(-1, bank.shape[0]), bank, k)  # (in/b * r, b)
    A = A.reshape(la_theirs.shape[0], r, -1).transpose(1, 2).reshape(-1, r)  # (in/b, b, r) -> (in, r)
    B = topk_admixture(lb.reshape(-1, bank.shape[0]), bank, k)  # (out/b * r, b)
    B = B.reshape(lb.shape[0], r, -1).transpose(0, 1).reshape(r, -1)  # (r, out/b, b) -> (r, out)
    return F.linear(x, W, bias) + x @ A @ B


@pytest.mark.parametrize("d_in, d_out", [(16, 24), (16, 16)])  # (16, 16): in/b = r, both shapes (2, 2, h)
def test_vblora_from_authors_state_dict(d_in, d_out):
    cfg = VBLoRAConfig(r=2, b=8, h=6, k=2)
    model = nn.Sequential()
    model.add_module("query", nn.Linear(d_in, d_out))
    bank_t = torch.randn(6, 8)
    la_t = torch.randn(d_in // 8, 2, 6)  # theirs: (in/b, r, h)
    lb = torch.randn(d_out // 8, 2, 6)  # (out/b, r, h), as ours
    theirs = {"vector_bank": bank_t, "query.vector_bank": bank_t, "query.logits_A": la_t,
              "query.logits_B": lb, "query.weight": model.query.weight.detach(), "query.bias": model.query.bias}
    x = torch.randn(5, d_in)
    expected = _vb_authors_forward(x, model.query.weight, model.query.bias, bank_t, la_t, lb, 2)
    apply_vblora(model, cfg, ["query"])
    converted = from_authors_state_dict(theirs)
    assert sorted(converted) == ["query.vblora_logits_A", "query.vblora_logits_B", "vblora_bank.vectors"]
    load_vblora_state_dict(model, converted)
    with torch.no_grad():
        assert_close(model(x), expected)
    if d_in == d_out:  # the unconverted tensor has the right shape and loads, into a different adapter
        load_vblora_state_dict(model, {**converted, "query.vblora_logits_A": la_t})
        with torch.no_grad():
            assert not torch.allclose(model(x), expected, atol=1e-3)
    with pytest.raises(ValueError, match="vector_bank"):
        from_authors_state_dict({**theirs, "query.vector_bank": bank_t + 1})


# ================================================================================================
# kernels.py: every op against its reference (on the CPU under TRITON_INTERPRET=1, or on CUDA)
# ================================================================================================
# Forward and every gradient of each op vs its plain-PyTorch reference run in float64 on the same (rounded)
# inputs, over odd shapes that cross tile borders (interpreter tiles are 32 wide), then the checks one op
# needs: dropout masks, determinism, what is saved, bad input, autocast; last, an H100 compile of every kernel.
KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def triton_on(monkeypatch, kernel_device):
    monkeypatch.delenv("NANOPEFT_NO_TRITON", raising=False)


def _leaf(t, dtype=None, grad=True):
    return t.detach().to(dtype or t.dtype).requires_grad_(grad)


def _run(fn, inputs, grads_out):
    """fn(*inputs) as a tuple, backpropagated with grads_out; the .grad of every input (None where none)."""
    for t in inputs:
        t.grad = None
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads_out, strict=True)])
    return outs, [t.grad for t in inputs]


def _check(fn, ref, inputs, grads_out, dtype):
    """fn vs ref in float64: outputs, and the gradient of every input that requires one (None elsewhere)."""
    ref_inputs = [_leaf(t, torch.float64, t.requires_grad) for t in inputs]
    outs, grads = _run(fn, inputs, grads_out)
    ref_outs, ref_grads = _run(ref, ref_inputs, [g.double() for g in grads_out])
    for o, r in zip(outs, ref_outs, strict=True):
        assert o.dtype == dtype
        assert_close(o, r, dtype)
    for t, gr, r in zip(inputs, grads, ref_grads):
        if not t.requires_grad:
            assert gr is None
            continue
        assert gr is not None and gr.dtype == t.dtype, (t.dtype, None if gr is None else gr.dtype)
        assert_close(gr, r, dtype)
    return outs, grads


def _vblora_logits(S, h):
    # distinct values per row, exact in bf16/fp16 too, so every dtype's top-k picks the same entries
    return torch.stack([torch.randperm(h) for _ in range(S)]).float() * (3.0 / h)  # (S, h)


def _case(op, c, dtype):
    """(fn, reference, input leaves, output gradients) for one shape case of an op."""
    rn = lambda *s: torch.randn(*s)
    lead = c.get("lead", ())
    if op == "lowrank_linear":  # LoRA (no d), SiVA (d), VB-LoRA (A, B non-leaf, B a transposed view)
        IN, OUT, r = c["IN"], c["OUT"], c["r"]
        ins = [_leaf(rn(*lead, IN), dtype), _leaf(rn(OUT, IN), dtype, c.get("train_w", False)),
               _leaf(rn(OUT), dtype), _leaf(rn(r, IN), dtype)]
        if c.get("nonleaf"):
            ins.append(_leaf(rn(r, OUT), dtype))
            fn = lambda x, W, b, A, Bt: kernels.lowrank_linear(x, W, b, A * 1, (Bt * 1).t(), None, 2.0)
            ref = lambda x, W, b, A, Bt: kernels.lowrank_linear_reference(x, W, b, A * 1, (Bt * 1).t(), None, 2.0)
        else:
            ins += [_leaf(rn(OUT, r), dtype)] + ([_leaf(rn(r), dtype)] if c.get("d") else [])
            fn = lambda *t: kernels.lowrank_linear(*t[:5], t[5] if len(t) > 5 else None, 0.7)
            ref = lambda *t: kernels.lowrank_linear_reference(*t[:5], t[5] if len(t) > 5 else None, 0.7)
        return fn, ref, ins, [rn(*lead, OUT)]
    if op == "sera_delta":
        IN, OUT, r, s = c["IN"], c["OUT"], c["r"], c["split"]
        ins = [_leaf(t, dtype) for t in (rn(*lead, IN), rn(s, IN // s, r // s), rn(r, r), rn(s, r // s, OUT // s))]
        return (lambda *t: kernels.sera_delta(*t, 0.5)), (lambda *t: kernels.sera_delta_reference(*t, 0.5)), ins, \
            [rn(*lead, OUT)]
    if op == "vblora_compose":
        S, h, b, k = c["S"], c["h"], c["b"], c["k"]
        ins = [_leaf(_vblora_logits(S, h), dtype), _leaf(torch.rand(h, b) * 0.04 - 0.02, dtype)]
        return (lambda L, B: kernels.vblora_compose(L, B, k)), \
            (lambda L, B: kernels.vblora_compose_reference(L, B, k)), ins, [rn(S, b)]
    if op == "bone_row":
        IN, b = c["IN"], c["b"]
        ins = [_leaf(rn(*lead, IN), dtype), _leaf(rn(IN // b, b, b) * 0.1, dtype)]
        return kernels.bone_row, kernels.bone_row_reference, ins, [rn(*lead, IN), rn(*lead, b)]
    if op == "bone_col_linear":
        IN, OUT, b = c["IN"], c["OUT"], c["b"]
        ins = [_leaf(rn(*lead, IN), dtype), _leaf(rn(OUT, IN) / math.sqrt(IN), dtype, False),
               _leaf(rn(OUT // b, b, b) * 0.1, dtype)] + ([_leaf(rn(OUT), dtype)] if c.get("bias") else [])
        return kernels.bone_col_linear, kernels.bone_col_linear_reference, ins, [rn(*lead, OUT)]
    raise KeyError(op)


# op -> shape cases: 1 row (a partial tile), 9, 41 (several tiles), 341 rows as (11, 31) (3-D input, many
# tiles); odd widths, ranks that are not powers of two, ranks above 16 (padded to 64 for tl.dot)
KERNEL_CASES = {
    "lowrank_linear": [dict(lead=(1,), IN=32, OUT=48, r=1), dict(lead=(9,), IN=80, OUT=48, r=4, d=True, train_w=True),
                       dict(lead=(41,), IN=48, OUT=77, r=33, d=True), dict(lead=(11, 31), IN=75, OUT=43, r=16),
                       dict(lead=(2, 9), IN=40, OUT=37, r=5, nonleaf=True)],
    "sera_delta": [dict(lead=(1,), IN=32, OUT=48, r=8, split=8), dict(lead=(9,), IN=80, OUT=48, r=16, split=4),
                   dict(lead=(41,), IN=48, OUT=80, r=4, split=2), dict(lead=(11, 31), IN=75, OUT=43, r=8, split=1),
                   dict(lead=(2, 5), IN=64, OUT=96, r=32, split=16)],
    "vblora_compose": [dict(S=1, h=16, b=16, k=1), dict(S=9, h=40, b=24, k=2), dict(S=41, h=16, b=16, k=3),
                       dict(S=341, h=16, b=16, k=3), dict(S=9, h=16, b=136, k=2)],
    "bone_row": [dict(lead=(1,), IN=32, b=16), dict(lead=(9,), IN=96, b=32), dict(lead=(41,), IN=72, b=24),
                 dict(lead=(11, 31), IN=64, b=16), dict(lead=(2, 5), IN=96, b=48)],
    "bone_col_linear": [dict(lead=(1,), IN=32, OUT=64, b=16), dict(lead=(9,), IN=96, OUT=64, b=32, bias=True),
                        dict(lead=(41,), IN=48, OUT=72, b=24, bias=True), dict(lead=(11, 31), IN=64, OUT=32, b=16),
                        dict(lead=(2, 5), IN=96, OUT=48, b=48, bias=True)],
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("op,case", [(op, c) for op, cs in KERNEL_CASES.items() for c in cs],
                         ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}{v[k]}" for k in v))
def test_kernel_matches_reference(op, case, dtype, triton_on):
    _check(*_case(op, case, dtype), dtype)


# ---------------------------------------------------------------- the references are the maths

def test_sera_reference_is_dense_blockdiag():
    x, A, C, B = torch.randn(7, 48), torch.randn(4, 12, 2), torch.randn(8, 8), torch.randn(4, 2, 8)
    dense = 0.3 * x @ torch.block_diag(*A) @ C @ torch.block_diag(*B)  # the paper's x A C B, literally
    torch.testing.assert_close(kernels.sera_delta_reference(x, A, C, B, 0.3), dense)


def test_vblora_reference_vs_row_loop():
    S, h, b, k = 7, 12, 5, 3
    logits, bank = torch.randn(S, h), torch.randn(h, b)
    out = _vb_loop_compose(logits, bank.double(), k)  # (S, b) float64
    torch.testing.assert_close(kernels.vblora_compose_reference(logits, bank, k).double(), out, atol=1e-6, rtol=1e-6)


def test_bone_row_reference_vs_chunk_loop():
    x, B = torch.randn(3, 5, 12), torch.randn(3, 4, 4)
    y, ts = kernels.bone_row_reference(x, B)
    t = [x[..., 4 * j:4 * (j + 1)] @ B[j].T for j in range(3)]  # (3, 5, 4) each
    torch.testing.assert_close(y, x + torch.cat(t, -1))
    torch.testing.assert_close(ts, t[0] + t[1] + t[2])


def test_bone_col_reference_vs_block_loop():
    n_out, n_in, b = 8, 12, 4
    x, W, B, bias = torch.randn(5, n_in), torch.randn(n_out, n_in), torch.randn(n_out // b, b, b), torch.randn(n_out)
    Wp = _bone_ref_weight(W, B, b, "col", "bone")  # W_ij + W_ij B_i + B_i, block by block
    torch.testing.assert_close(kernels.bone_col_linear_reference(x, W, B, bias), x @ Wp.T + bias)


# ---------------------------------------------------------------- applies(), and ops where it is false

def test_applies_truth_table(monkeypatch):
    cpu32, bf16, f16 = torch.randn(2), torch.randn(2).bfloat16(), torch.randn(2).half()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "1")
    assert not kernels.applies(cpu32)  # the kill switch wins
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "0")
    assert kernels.applies(cpu32, bf16, f16, None)
    assert not kernels.applies(cpu32, torch.randn(2).double())  # float64 is not a kernel dtype
    assert not kernels.applies(torch.arange(3))
    assert not kernels.applies(torch.empty(2, device="meta"))
    assert not kernels.applies(cpu32, torch.empty(2, device="meta"))  # mixed devices
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.applies(cpu32)  # CPU tensors need the interpreter


def test_ops_refuse_tensors_no_kernel_applies_to(monkeypatch):
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "1")
    for op, cs in KERNEL_CASES.items():
        fn, _, ins, _ = _case(op, cs[1], torch.float32)
        with pytest.raises(RuntimeError, match=f"kernels.{op}: no kernel applies"):
            fn(*ins)
    with pytest.raises(RuntimeError, match="no kernel applies"):
        kernels.dropout_mask(torch.tensor([1]), 2, 3, 0.5)


# ---------------------------------------------------------------- the low-rank path

def test_lowrank_linear_adds_low_rank_dx_into_base_grad(triton_on, monkeypatch):
    calls, real = [], kernels._lowrank_linear_bwd
    monkeypatch.setattr(kernels, "_lowrank_linear_bwd", lambda *a, **k: calls.append(k.get("dx") is not None)
                        or real(*a, **k))
    _check(*_case("lowrank_linear", KERNEL_CASES["lowrank_linear"][1], torch.float32), torch.float32)
    assert calls == [True]  # the kernel ran, accumulating into cuBLAS's g W


def test_lowrank_linear_and_sera_grads_only_where_needed(triton_on):
    fn, ref, (x, W, bias, A, B, d), g = _case("lowrank_linear", dict(lead=(9,), IN=48, OUT=32, r=4, d=True),
                                              torch.float32)
    x.requires_grad_(False), B.requires_grad_(False), bias.requires_grad_(False)
    _check(fn, ref, [x, W, bias, A, B, d], g, torch.float32)  # only A and d get (correct) gradients
    fn, ref, (x, A, C, B), g = _case("sera_delta", dict(lead=(9,), IN=32, OUT=48, r=8, split=4), torch.float32)
    x.requires_grad_(False), A.requires_grad_(False)
    _check(fn, ref, [x, A, C, B], g, torch.float32)


def test_lowrank_linear_deterministic_and_mixed_dtypes(triton_on):
    # bf16 activations with fp32 adapter weights, the pattern under autocast; grads keep each input's dtype
    x, W, bias = _leaf(torch.randn(41, 80), torch.bfloat16), torch.randn(48, 80).bfloat16(), None
    A, B, d = _leaf(torch.randn(8, 80)), _leaf(torch.randn(48, 8)), _leaf(torch.randn(8))
    g = torch.randn(41, 48).bfloat16()
    fn = lambda x, A, B, d: kernels.lowrank_linear(x, W, bias, A, B, d, 0.5)
    runs = [_run(fn, [x, A, B, d], [g]) for _ in range(2)]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.equal(a, b)  # no atomics: bit-identical gradients run to run
    (out,), grads = runs[0]
    (ref,), ref_grads = _run(lambda x, A, B, d: kernels.lowrank_linear_reference(x, W.double(), None, A, B, d, 0.5),
                             [_leaf(t, torch.float64) for t in (x, A, B, d)], [g.double()])
    assert out.dtype == grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    for a, b in zip([out] + grads, [ref] + ref_grads):
        assert_close(a, b, torch.bfloat16)


def test_lowrank_linear_large_rank_and_bad_shapes(triton_on):
    r = kernels._MAX_RANK + 2  # above the register budget: the reference runs, same maths
    fn, ref, ins, g = _case("lowrank_linear", dict(lead=(5,), IN=32, OUT=16, r=r, d=True), torch.float32)
    _check(fn, ref, ins, g, torch.float32)
    x, W = torch.randn(5, 32), torch.randn(16, 32)
    with pytest.raises(ValueError, match="lowrank_linear: shapes"):
        kernels.lowrank_linear(x, W, None, torch.randn(4, 31), torch.randn(16, 4))
    with pytest.raises(ValueError, match="lowrank_linear: shapes"):
        kernels.lowrank_linear(x, W, None, torch.randn(4, 32), torch.randn(16, 4), torch.randn(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lowrank_linear_dropout_matches_masked_reference(triton_on, dtype):
    # LoRA's dropout drawn in-kernel: forward and every gradient equal the formula with x~ = m x / (1 - p),
    # m the mask dropout_mask() draws for the same seed (so the fwd, bwd and weight-grad kernels agree on it)
    p, lead, d_in, d_out = 0.3, (5, 9), 80, 40
    x, A, B, bias = _leaf(torch.randn(*lead, d_in), dtype), _leaf(torch.randn(6, d_in), dtype), \
        _leaf(torch.randn(d_out, 6), dtype), _leaf(torch.randn(d_out), dtype)
    W = torch.randn(d_out, d_in).to(dtype)
    seed = torch.tensor([20261122])
    keep = kernels.dropout_mask(seed, 45, d_in, p).reshape(*lead, d_in)
    assert 0.5 < keep.float().mean() < 0.9  # a real mask, neither all-keep nor all-drop
    fn = lambda x, bias, A, B: kernels.lowrank_linear(x, W, bias, A, B, None, 0.5, dropout=p, seed=seed)
    ref = lambda x, bias, A, B: F.linear(x, W.to(x.dtype), bias) + 0.5 * (x * keep / (1 - p)) @ A.T @ B.T
    _check(fn, ref, [x, bias, A, B], [torch.randn(*lead, d_out)], dtype)


def test_dropout_mask_statistics_and_seeds(triton_on):
    s1, s2 = torch.tensor([1]), torch.tensor([2])
    m = kernels.dropout_mask(s1, 200, 300, 0.3)
    assert m.dtype == torch.bool and m.shape == (200, 300)
    assert abs(m.float().mean().item() - 0.7) < 0.012  # 60,000 Bernoulli(0.7) draws: 6 sigma
    assert abs(m[:, :150].float().mean().item() - m[:, 150:].float().mean().item()) < 0.02  # no column bias
    assert torch.equal(m, kernels.dropout_mask(s1, 200, 300, 0.3))  # a pure function of the seed
    assert (m != kernels.dropout_mask(s2, 200, 300, 0.3)).float().mean() > 0.3  # another seed, another mask
    with pytest.raises(ValueError, match="dropout"):
        kernels.lowrank_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2),
                               dropout=1.0)


def test_lora_layer_dropout_in_kernels(triton_on):
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
    assert_close(layer(x), full)


def test_lowrank_linear_under_autocast(triton_on):
    x = _leaf(torch.randn(4, 40))
    W, bias = torch.randn(24, 40), torch.randn(24)
    A, B = _leaf(torch.randn(2, 40)), _leaf(torch.randn(24, 2))
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        y = kernels.lowrank_linear(x, W, bias, A, B, None, 0.5)
    assert y.dtype == torch.bfloat16  # the compute dtype follows autocast, like nn.Linear's
    y.float().sum().backward()
    assert x.grad.dtype == A.grad.dtype == B.grad.dtype == torch.float32
    assert_close(y, F.linear(x, W, bias) + 0.5 * (x @ A.T) @ B.T, torch.bfloat16)


# ---------------------------------------------------------------- SeRA, VB-LoRA, Bone

def test_sera_delta_autocast_and_bad_shapes(triton_on):
    _, _, (x, A, C, B), _ = _case("sera_delta", dict(lead=(9,), IN=32, OUT=48, r=8, split=4), torch.float32)
    with torch.autocast(KERNEL_DEVICE, dtype=torch.bfloat16):
        out = kernels.sera_delta(x, A, C, B, 1.0)
    assert out.dtype == torch.bfloat16  # the compute dtype follows autocast, like the reference's einsums
    assert_close(out, kernels.sera_delta_reference(*[t.double() for t in (x, A, C, B)], 1.0), torch.bfloat16)
    with pytest.raises(ValueError, match="sera_delta"):
        kernels.sera_delta(torch.randn(9, 30), A, C, B, 1.0)
    with pytest.raises(ValueError, match="sera_delta"):
        kernels.sera_delta(x, A, torch.randn(4, 4), B, 1.0)
    with pytest.raises(ValueError, match="sera_delta"):
        kernels.sera_delta(x, A[0], C, B, 1.0)


def test_vblora_compose_grads_deterministic_selected_only(triton_on):
    S, h, b, k = 41, 40, 16, 2
    logits = _leaf(_vblora_logits(S, h))
    logits.data[:, :5] = -1.0  # bank rows 0..4 are never selected
    grads = []
    for _ in range(2):
        logits.grad = None
        bank = _leaf(torch.ones(h, b))
        kernels.vblora_compose(logits, bank, k).pow(2).sum().backward()
        grads.append(bank.grad)
    assert torch.equal(grads[0], grads[1])  # the bank scatter sums in a fixed order: bit-identical
    assert (grads[0][:5] == 0).all() and (grads[0][5:].abs().sum(-1) > 0).any()
    assert (logits.grad != 0).sum(-1).le(k).all()  # only the selected logits get gradient


def test_vblora_compose_bad_input(triton_on):
    with pytest.raises(ValueError, match="k=5"):
        kernels.vblora_compose(torch.randn(3, 4), torch.randn(4, 8), 5)
    with pytest.raises(ValueError, match="bank"):
        kernels.vblora_compose(torch.randn(3, 4), torch.randn(5, 8), 2)


@pytest.mark.parametrize("op,case", [("bone_row", dict(lead=(41,), IN=64, b=32)),
                                     ("bone_row", dict(lead=(47,), IN=96, b=48)),
                                     ("bone_col_linear", dict(lead=(41,), IN=96, OUT=32, b=32)),
                                     ("bone_col_linear", dict(lead=(21,), IN=96, OUT=48, b=48))])
def test_bone_small_tiles(triton_on, monkeypatch, op, case):
    # 16-wide tiles: several tiles per b-block, W' tiles summed over several r-tiles; the dB reductions
    # split in 2 (over row blocks for row, over column blocks j for col)
    b = case["b"]
    blocks = (case["IN"] if op == "bone_row" else case["OUT"]) // b
    monkeypatch.setattr(kernels, "BLOCK_INTERPRET", 16)
    monkeypatch.setattr(kernels, "_SPLIT_TARGET", 2 * blocks * math.ceil(b / 16) ** 2)
    _check(*_case(op, case, torch.float32), torch.float32)


def test_bone_row_bad_input(triton_on):
    with pytest.raises(ValueError, match="bone_row"):
        kernels.bone_row(torch.randn(2, 30), torch.randn(2, 16, 16))


def test_bone_col_saves_no_out_by_in_tensor(triton_on):
    n_in, n_out, b = 64, 96, 32
    x, W, B = _leaf(torch.randn(9, n_in)), torch.randn(n_out, n_in), _leaf(torch.randn(n_out // b, b, b))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = kernels.bone_col_linear(x, W, B)
    big = [t for t in saved if t.numel() >= n_out * n_in]
    assert saved and all(t.data_ptr() == W.data_ptr() for t in big)  # only the frozen W itself, no W'
    y.sum().backward()
    assert x.grad is not None and B.grad is not None


def test_bone_col_bad_input(triton_on):
    W = torch.randn(64, 48)
    with pytest.raises(ValueError, match="b \\| in"):
        kernels.bone_col_linear(torch.randn(2, 48), W, torch.randn(2, 32, 32))
    with pytest.raises(ValueError, match="in=48"):
        kernels.bone_col_linear(torch.randn(2, 40), W, torch.randn(4, 16, 16))
    with pytest.raises(ValueError, match="frozen"):
        kernels.bone_col_linear(torch.randn(2, 48), W.requires_grad_(True), torch.randn(4, 16, 16))


# ---------------------------------------------------------------- every kernel compiles for an H100
# Ahead-of-time compilation of every Triton kernel for an H100 (sm_90), on this GPU-less machine.
# The interpreter (TRITON_INTERPRET=1, what the kernel tests run) accepts code the real compiler rejects;
# this test runs the real compiler down to a cubin with the argument types and constexprs the launchers
# pass on CUDA. It proves the kernels compile, not that they are right or fast on a GPU.

def _aot_compile_all(repo, shard=0, n_shards=1):
    """Run in a fresh interpreter without TRITON_INTERPRET: call the launchers with fake CUDA tensors of
    GPT-2-Medium shapes, record each kernel launch instead of running it, and compile every distinct
    launch (every config of an autotuned kernel) for sm_90 with Triton's own argument specialisation;
    this process compiles the distinct launches i with i % n_shards == shard (the list is the same in every
    shard). Prints one line per compile (registers, stack, shared memory from the cubin) and the number of
    distinct launches; raises if any compile fails or if some kernel is reached by no launch below."""
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
        finally:  # helpers the kernels call (_dropout, ...) are looked up in K at compile time
            for n, v in launched.items():
                setattr(K, n, v)

    N, D, r, b_bone = 4096, 1024, 4, 64
    layers = ((D, D), (D, 4 * D), (4 * D, D))
    # (activations, adapter params, frozen weight, TF32 on): autocast bf16 over fp32 params with TF32 as
    # train_vit.py sets it, a bf16 model, fp32 throughout
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
                    capture(lab, K._lowrank_linear_fwd, torch.empty_like(g), x, A, B, dd, 2.0, h, dot, prec)
                    capture(lab, K._lowrank_linear_bwd, g, x, A, B, dd, h, 2.0, (True, True, True, dd is not None),
                            dot, prec)
                seed = torch.empty(1, dtype=torch.int64, **cuda)  # LoRA with dropout: masks drawn in-kernel
                lab = (name, f"{n_in}->{n_out} dropout")
                capture(lab, K._lowrank_linear_fwd, torch.empty_like(g), x, A, B, None, 2.0, h, dot, prec, seed, 0.1)
                capture(lab, K._lowrank_linear_bwd, g, x, A, B, None, h, 2.0, (True, True, True, False), dot, prec,
                        torch.empty_like(x), seed, 0.1)  # dx accumulated into, as lowrank_linear does
                capture(lab, K.dropout_mask, seed, N, n_in, 0.1)
                s = 8  # SeRA r = split = 8
                As = torch.empty(s, n_in // s, 1, dtype=par, **cuda)
                C = torch.empty(s, s, dtype=par, **cuda)
                Bs = torch.empty(s, 1, n_out // s, dtype=par, **cuda)
                h1 = torch.empty(N, s, dtype=torch.float32, **cuda)
                lab = (name, f"{n_in}->{n_out}")
                capture(lab, K._sera_delta_fwd, x, As, C, Bs, 2.0, h1, torch.empty_like(g), dot, prec)
                capture(lab, K._sera_delta_bwd, g, x, As, C, Bs, h1, 2.0, (True,) * 4, dot, prec)
                Br = torch.empty(n_in // b_bone, b_bone, b_bone, dtype=par, **cuda)
                capture(lab, K._bone_row_fwd, x, Br)
                capture(lab, K._bone_row_bwd, x, torch.empty(N, b_bone, dtype=act, **cuda), x, Br, True, True)
                W = torch.empty(n_out, n_in, dtype=wt, **cuda)
                Bc = torch.empty(n_out // b_bone, b_bone, b_bone, dtype=par, **cuda)
                capture(lab, K._bone_col_linear_fwd, W, Bc, act)
                capture(lab, K._bone_col_linear_bwd, torch.empty(n_out, n_in, dtype=act, **cuda), W, Bc)
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
                if (len(seen) - 1) % n_shards != shard:
                    continue
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
    print(f"shard {shard}: {len(seen)} distinct launches, compiled {len(range(shard, len(seen), n_shards))} in "
          f"{time.perf_counter() - total:.1f}s, {len(failures)} failed")
    assert not failures, "\n".join(failures)


def test_aot_every_kernel_compiles_for_h100():
    """The distinct launches split over 2 processes compiling side by side (each compile is one-threaded)."""
    if not kernels.HAS_TRITON or _triton_version() < INTERPRETER_TESTED:  # it drives triton's internal compile API
        pytest.skip(f"the ahead-of-time compile uses triton's internals as of {INTERPRETER_TESTED}")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANOPEFT_NO_TRITON")}
    repo = os.path.dirname(os.path.abspath(kernels.__file__))
    src = textwrap.dedent(inspect.getsource(_aot_compile_all))
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # compile from scratch every run
        procs = [subprocess.Popen([sys.executable, "-c", src + f"\n_aot_compile_all({repo!r}, {i}, 2)\n"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        print(out)
        assert p.returncode == 0, out[-4000:] + err[-6000:]
    n = [int(re.search(r"(\d+) distinct launches", out).group(1)) for out, _ in outs]
    assert n[0] == n[1] and sum(out.count("\nok ") + out.startswith("ok ") for out, _ in outs) == n[0]


# ---- bench.py


def test_kernels_bench_without_peft_says_why_its_rows_are_missing(monkeypatch, capsys):
    import bench
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    rows = [name for name, _ in bench.methods()]
    assert rows and not any(r.startswith("peft") for r in rows)
    assert "note: no peft-* rows: `import peft` failed (ModuleNotFoundError" in capsys.readouterr().out


def test_kernels_bench_peft_rows_from_the_repository_root_without_triton():
    _needs_hf()
    out = _python(NO_TRITON + "import bench\nprint([n for n, _ in bench.methods()])\n", ROOT)
    assert "'peft-lora'" in out and "'peft-vblora'" in out and "note:" not in out, out


# ================================================================================================
# Dispatch: how the method files hand over to kernels.py
# ================================================================================================
# A method file runs its formula unless kernels.applies(...) is true, then the op below, forward and backward.

DISPATCH = {  # method -> (attach to fc1, fc2; the public ops and launchers its layers must reach)
    "lora": (lambda m: lora.apply_lora(m, lora.LoRAConfig(r=4, dropout=0.0), ["fc1", "fc2"]),
             ["lowrank_linear", "_lowrank_linear_fwd", "_lowrank_linear_bwd"]),
    "sera": (lambda m: sera.apply_sera(m, sera.SeRAConfig(r=8, split=4), ["fc1", "fc2"]),
             ["sera_delta", "_sera_delta_fwd", "_sera_delta_bwd"]),
    "siva": (lambda m: siva.apply_siva(m, siva.SiVAConfig(perc=0.9), ["fc1", "fc2"]),
             ["lowrank_linear", "_lowrank_linear_fwd", "_lowrank_linear_bwd"]),
    "bone-row": (lambda m: bone.apply_bone(m, bone.BoneConfig(b=16, grouping="row"), ["fc1", "fc2"]),
                 ["bone_row", "_bone_row_fwd", "_bone_row_bwd"]),
    "bone-col": (lambda m: bone.apply_bone(m, bone.BoneConfig(b=16, grouping="col"), ["fc1", "fc2"]),
                 ["bone_col_linear", "_bone_col_linear_fwd", "_bone_col_linear_bwd"]),
    "vblora": (lambda m: vblora.apply_vblora(m, vblora.VBLoRAConfig(r=4, b=16, h=12, k=2), ["fc1", "fc2"]),
               ["vblora_compose", "_vblora_compose_fwd", "_vblora_compose_bwd",
                "lowrank_linear", "_lowrank_linear_fwd", "_lowrank_linear_bwd"]),
}


class _DispatchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)
        self.requires_grad_(False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _dispatch_run(method):
    """Output, input gradient and adapter gradients of a 2-layer net with `method` on both layers."""
    torch.manual_seed(0)
    net = _DispatchNet()
    DISPATCH[method][0](net)
    with torch.no_grad():  # move every adapter off its zero start so every gradient is non-trivial
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = net(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(DISPATCH))
def test_dispatch_no_kernel_code_runs_where_none_applies(method, monkeypatch):
    """A CPU without the interpreter (applies() false): the method's formula alone, nothing of kernels.py."""
    monkeypatch.delenv("NANOPEFT_NO_TRITON", raising=False)
    called = []
    for name, fn in vars(kernels).items():
        if inspect.isfunction(fn) and fn.__module__ == "kernels" and name != "applies":
            monkeypatch.setattr(kernels, name, lambda *a, _n=name, **k: called.append(_n))
    monkeypatch.setattr(kernels, "applies", lambda *tensors: False)
    y, gx, grads = _dispatch_run(method)
    assert called == [] and y.isfinite().all() and gx is not None and grads


@pytest.mark.parametrize("method", list(DISPATCH))
def test_dispatch_methods_run_their_kernels_and_match_formula(method, monkeypatch, kernel_device):
    """With kernels applying, forward and backward go through the method's ops, and give what its plain
    formula gives (NANOPEFT_NO_TRITON=1)."""
    calls = set()
    for name in DISPATCH[method][1]:
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _n=name, **k: calls.add(_n) or _real(*a, **k))
    monkeypatch.setenv("NANOPEFT_NO_TRITON", "1")
    y_r, gx_r, g_r = _dispatch_run(method)
    assert calls == set(), f"{method}: NANOPEFT_NO_TRITON=1 still reached {calls}"
    monkeypatch.delenv("NANOPEFT_NO_TRITON")
    y_k, gx_k, g_k = _dispatch_run(method)
    assert calls == set(DISPATCH[method][1]), f"{method}: reached {calls}"
    assert_close(y_k, y_r)
    assert_close(gx_k, gx_r)
    assert g_k.keys() == g_r.keys() and len(g_k) > 0
    for n in g_k:
        assert_close(g_k[n], g_r[n])


# ================================================================================================
# GPT-2 on E2E: model_gpt2.py, e2e.py, train_gpt2.py (and what it takes from common.py)
# ================================================================================================
def _read_adapter(path):
    """A run's adapter.safetensors read with safetensors alone: its header's JSON and its tensors ("head." ones apart)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        blob, tensors = json.loads(f.metadata()["nanopeft"]), {k: f.get_tensor(k) for k in f.keys()}
    blob["adapter"] = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    blob["head"] = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    return blob


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
    model = model_gpt2.GPT(model_gpt2.GPTConfig(block_size=block, vocab_size=vocab, n_layer=layers,
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
    return [" ".join(enc.decode(t).split()) for t in model_gpt2.beam_search(model, prompts, enc.eot_token, beam=2,
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


# ---- model_gpt2.py: Hugging Face GPT-2 checkpoints map onto our names


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
        model = model_gpt2.load_gpt2(source).eval()
        assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (L, H, C)
        assert isinstance(model.transformer.h[1].attn.q_proj, nn.Linear)
        assert model.lm_head.weight is model.transformer.wte.weight
        logits, _ = model(idx, targets=torch.zeros_like(idx))  # all positions kept: (B*T, V)
        torch.testing.assert_close(logits.view(2, 11, V), want, atol=1e-4, rtol=1e-4)
    q = model.transformer.h[0].attn.q_proj.weight
    torch.testing.assert_close(q, sd["h.0.attn.c_attn.weight"][:, :C].T)  # Conv1D (in, out) -> Linear (out, in)


# ---- e2e.py, data: the loss sees exactly the reference tokens; bad files are named with their line


# Rows of devset.csv / testset_w_refs.csv and their lines in microsoft/LoRA's valid.txt / test.txt, copied from those
# files (test.txt's tokenizer differs: "is n't", "5-star", "£ 20-£25"). Whole lines: valid.txt lines 26, 3238,
# test.txt lines 4680, 4091; completions: valid.txt lines 3394, 1752, 3876, 2930, 3614, 1791, 1024, 3754, 316,
# test.txt lines 1037, 548, 1092, 1650, 2183, 54, 543, 593, 1590, 1161.
_LORA_LINES = [  # (test.txt's form?, CSV mr, CSV ref, LoRA's line)
    (False, 'name[Alimentum], area[riverside], familyFriendly[no]',
     "Alimentum isn't family-friendly but it is in riverside.",
     "name : Alimentum | area : riverside | family friendly : no||Alimentum isn 't family - friendly but it is in "
     'riverside . '),
    (False, 'name[The Mill], eatType[coffee shop], food[English], priceRange[£20-25], area[riverside], near[The '
     'Sorrento]',
     'The Mill is a coffee shop in riverside near The Sorrento offers English foods for £20-25.',
     'name : The Mill | Type : coffee shop | food : English | price : £ 20 - 25 | area : riverside | near : The '
     'Sorrento||The Mill is a coffee shop in riverside near The Sorrento offers English foods for £ 20 - 25 . '),
    (True, 'name[Zizzi], eatType[pub], area[riverside]',
     'Zizzi is a riverside pub.',
     'name : Zizzi | Type : pub | area : riverside||Zizzi is a riverside pub . '),
    (True, 'name[The Wrestlers], eatType[pub], food[Japanese], priceRange[£20-25], area[riverside], '
     'familyFriendly[yes], near[Raja Indian Cuisine]',
     "The Wrestlers sells Japanese food for £20-25. It's a pub near Raja Indian Cuisine by riverside.",
     'name : The Wrestlers | Type : pub | food : Japanese | price : £ 20 - 25 | area : riverside | family friendly '
     ": yes | near : Raja Indian Cuisine||The Wrestlers sells Japanese food for £ 20 - 25 . It 's a pub near Raja "
     'Indian Cuisine by riverside . '),
]
_LORA_REFS = [  # (test.txt's form?, CSV ref, LoRA's completion of it)
    (False, "If you're looking for a highly-rated place in the riverside area, I would certainly recommend The "
     'Phoenix.',
     "If you 're looking for a highly - rated place in the riverside area , I would certainly recommend The "
     'Phoenix . '),
    (False, "Midsummer House has a high customer rating and is located near 'The Bakers'.",
     "Midsummer House has a high customer rating and is located near ' The Bakers ' . "),
    (False, 'Check out the kid friendly, 1-star place, The Wrestlers.',
     'Check out the kid friendly , 1 - star place , The Wrestlers . '),
    (False, 'The Golden Palace is a riverside coffee shop which also serves Chinese food for £20-£25. It has a '
     'high customer rating.',
     'The Golden Palace is a riverside coffee shop which also serves Chinese food for £ 20- £ 25 . It has a high '
     'customer rating . '),
    (False, 'The Punter might have low ratings...but it is riverside and offers a children Friendly great time.',
     'The Punter might have low ratings ... but it is riverside and offers a children Friendly great time . '),
    (False, 'Kid friendly, .Taste of Cambridge Chinese coffee shop is in riverside, near Crowne Plaza Hotel.',
     'Kid friendly , .Taste of Cambridge Chinese coffee shop is in riverside , near Crowne Plaza Hotel . '),
    (False, 'Cotto is a coffee shop with Chinese food in the high price range with a customer rating of 1 out of '
     '5. in the city centre area near The Portland Arms.',
     'Cotto is a coffee shop with Chinese food in the high price range with a customer rating of 1 out of 5. in '
     'the city centre area near The Portland Arms . '),
    (False, 'A highly rated coffee shop "The Punter" serving English food priced between £20 - £25 and is child '
     'friendly',
     'A highly rated coffee shop " The Punter " serving English food priced between £ 20 - £ 25 and is child '
     'friendly '),
    (False, 'There is a low rated coffee shop Aromi in the city centre that is not family-friendly.. It provides '
     'French food.',
     'There is a low rated coffee shop Aromi in the city centre that is not family - friendly .. It provides '
     'French food . '),
    (True, "The highly rated restaurant, The Cricketers, is located near Crowne Plaza Hotel. Don't bring the kids.",
     "The highly rated restaurant , The Cricketers , is located near Crowne Plaza Hotel . Do n't bring the kids . "),
    (True, "If you're looking for a great place to eat, try Green Man, a pub near All Bar One with a customer "
     'rating of 3 out of 5 stars.',
     "If you 're looking for a great place to eat , try Green Man , a pub near All Bar One with a customer rating "
     'of 3 out of 5 stars . '),
    (True, "Known as 'average' and 'Family Friendly' , The Cricketers offers restaurant food near the Café Sicilia",
     "Known as ' average ' and ' Family Friendly ' , The Cricketers offers restaurant food near the Café Sicilia "),
    (True, 'The Mill is a low-cost, fast food, 5-star, pub located near the Café Sicilia by the river.',
     'The Mill is a low - cost , fast food , 5-star , pub located near the Café Sicilia by the river . '),
    (True, 'The Phoenix is a pub located near Raja Indian Cuisine. They are kids friendly and cost between '
     '£20-£25. They serve French food.',
     'The Phoenix is a pub located near Raja Indian Cuisine . They are kids friendly and cost between £ 20-£25 . '
     'They serve French food . '),
    (True, 'Kid friendly, .Blue Spice Chinese pub is in riverside, near Rainbow Vegetarian Café.',
     'Kid friendly , .Blue Spice Chinese pub is in riverside , near Rainbow Vegetarian Café . '),
    (True, 'The Green Man pub received a rating of 1 out of 5.  it is located near All Bar One.',
     'The Green Man pub received a rating of 1 out of 5 . it is located near All Bar One . '),
    (True, 'Have you visited Green Man? Its a children friendly Italian pub near Raja Indian Cuisine located by '
     'the riverside.',
     'Have you visited Green Man ? Its a children friendly Italian pub near Raja Indian Cuisine located by the '
     'riverside . '),
    (True, 'Near the Raja Indian Cuisine in riverside with a price  Range of 20£-25 and is Kids Friendly  is a '
     'Fast food pub called The Mill',
     'Near the Raja Indian Cuisine in riverside with a price Range of 20£-25 and is Kids Friendly is a Fast food '
     'pub called The Mill '),
    (True, 'There is a restaurant called The Cricketers that provides Chinese food in the price range of £20-£25 '
     "it is in the city centre  near All Bar One and isn't kids friends.",
     'There is a restaurant called The Cricketers that provides Chinese food in the price range of £ 20-£25 it is '
     "in the city centre near All Bar One and is n't kids friends . "),
]


@pytest.mark.parametrize("test, mr, ref, line", _LORA_LINES + [(t, "name[X]", r, "name : X||" + c) for t, r, c in _LORA_REFS])
def test_gpt2_lora_line_gives_the_line_of_loras_e2e_files(test, mr, ref, line):
    assert e2e.lora_line(mr, ref, test=test) == line


def test_gpt2_lora_lines_encode_as_gpt2_encode_py_and_the_loss_sees_the_completion_only(tmp_path):
    # gpt2_encode.py --add_bos --add_eos written out: ids(context) + [EOS], then ids(' ' + completion) + [EOS], the
    # line read as format_converting_e2e.py reads it; in the byte-level encoding ids are UTF-8 bytes and EOS is 256
    lines = [_LORA_LINES[i][3] for i in (0, 3)] + ["name : A||A . "]
    (tmp_path / "train.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    examples = e2e.encode_e2e(e2e.read_lora_txt(str(tmp_path / "train.txt")), _gpt2_enc(), 512)
    x, y = e2e.collate(examples, pad=256)
    assert x.shape == y.shape == (3, max(len(t) for t, _ in examples) - 1)
    for i, line in enumerate(lines):
        context, completion = line.strip().split("||")
        prompt, target = list(context.encode()) + [256], list((" " + completion).encode()) + [256]
        assert examples[i] == (prompt + target, len(prompt))
        kept = (y[i] != model_gpt2.IGNORE).nonzero().flatten()
        assert y[i, kept].tolist() == target  # every completion token and the final EOS, nothing else
        assert kept.tolist() == list(range(len(prompt) - 1, len(prompt + target) - 1))
        assert x[i, :len(prompt + target) - 1].tolist() == (prompt + target)[:-1]
    # a prompt of max_len tokens leaves no completion token to learn from: dropped; one token less keeps one
    assert e2e.encode_e2e([("abc", "x"), ("ab", "x")], _gpt2_enc(), 4) == [([97, 98, 256, 32], 3)]


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"a||b\nno separator\n", "line 2: expected context||completion"),
    (b"a||b\n || b\n", "line 2: expected"), (b"a||b||c\n", "line 1: expected"), (b"a||b\na||caf\xe9\n", "line 2: not UTF-8")])
def test_gpt2_bad_lora_e2e_file_fails_before_training_naming_file_and_line(tmp_path, content, message):
    for f in ("train.txt", "valid.txt", "test.txt"):  # LoRA's files: no CSV needed
        (tmp_path / f).write_bytes(b"name : A||A . \n")
    (tmp_path / "valid.txt").write_bytes(content)
    msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora"))
    assert msg.startswith(f"error: {tmp_path / 'valid.txt'}") and message in msg, msg


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
        (tmp_path / split).write_bytes(content)  # a header-only file would train 0 steps
        msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora"))
        assert msg.startswith(f"error: {tmp_path / split}") and message in msg, msg
        assert not (tmp_path / "out").exists()
        _gpt2_write_e2e(tmp_path)


def test_gpt2_lm_text_blocks_cover_the_text_and_every_next_token_is_a_target(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefghij" * 7)
    (tmp_path / "b.txt").write_text("xyz" * 9)
    enc = _gpt2_enc()
    train, dev = e2e.encode_lm_text([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], enc, 4)
    tokens = list(b"abcdefghij" * 7) + [256] + list(b"xyz" * 9) + [256]  # 99 tokens: 24 blocks, 3 left over
    blocks = [tokens[i:i + 4] for i in range(0, 96, 4)]
    assert [t for t, _ in train] == [b for i, b in enumerate(blocks) if i % 20 != 19]
    assert [t for t, _ in dev] == [blocks[19]]  # every 20th block is held out
    x, y = e2e.collate(train[:3], enc.eot_token)
    assert (y != model_gpt2.IGNORE).all() and torch.equal(y[:, :-1], x[:, 1:])  # a target at every position
    assert y[:, -1].tolist() == [t[-1] for t, _ in train[:3]]


def test_gpt2_lm_text_reads_the_endoftext_marker_as_one_eos_token(tmp_path):
    (tmp_path / "docs.txt").write_text("ab<|endoftext|>\ncd<|endoftext|>\n<|fim|>")
    (tmp_path / "plain.txt").write_text("ab <|endoftext" * 3)  # no whole marker: plain text, as before
    enc = _gpt2_enc()
    train, dev = e2e.encode_lm_text([str(tmp_path / "docs.txt")], enc, 2)
    tokens = [97, 98, 256, 10, 99, 100, 256, 10] + list(b"<|fim|>") + [256]  # another <|...|> stays plain text
    assert [t for t, _ in train] == [tokens[i:i + 2] for i in range(0, 16, 2)]
    train, _ = e2e.encode_lm_text([str(tmp_path / "plain.txt")], enc, 4)
    assert sum((t for t, _ in train), []) == (list(b"ab <|endoftext") * 3 + [256])[:40]


def test_gpt2_lm_text_bad_input_is_one_line(tmp_path):
    (tmp_path / "short.txt").write_text("abc")
    with pytest.raises(SystemExit, match=r"^error: --lm_text: 4 tokens make 1 block\(s\) of 4; need 2"):
        e2e.encode_lm_text([str(tmp_path / "short.txt")], _gpt2_enc(), 4)
    with pytest.raises(SystemExit, match=r"^error: --lm_text .*nope.txt' is not a non-empty file$"):
        train_gpt2.check_args(train_gpt2.get_args(["--lm_text", f"{tmp_path / 'short.txt'},{tmp_path / 'nope.txt'}"]))


def test_gpt2_lm_pretraining_then_fine_tuning_from_its_adapter(tmp_path):
    (tmp_path / "text.txt").write_text("the cafe serves french food near the river. " * 40)
    res = _gpt2_main(["--lm_text", tmp_path / "text.txt", "--method", "full", "--init_from", "scratch",
                            "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--max_len",
                            "32", "--batch_size", "4", "--max_iters", "6", "--lr", "1e-2", "--warmup_iters", "1",
                            "--label_smoothing", "0", "--log_interval", "2", "--eval_iters", "2", "--device", "cpu",
                            "--out_dir", tmp_path / "base"])
    assert res["predictions"] == [] and [s for s, _ in res["curve"]] == [2, 4, 6]
    assert res["curve"][-1][1] < res["curve"][0][1] and res["train_loss"] == res["curve"][-1][1]
    assert res["dev_loss"] is not None and res["n_trainable"] == res["n_stored"] > 0 and res["tokens_per_s"] > 0
    with open(tmp_path / "trainset.csv", "w") as f:
        f.write("mr,ref\r\n" + "".join(f'"name[C{i}], food[French]","C{i} serves French food."\r\n' for i in range(6)))
    for split in ("devset.csv", "testset_w_refs.csv"):
        (tmp_path / split).write_text((tmp_path / "trainset.csv").read_text())
    ft = _gpt2_main(["--method", "none", "--init_from", tmp_path / "base" / "adapter.safetensors", "--data_dir", tmp_path,
                           "--eval_samples", "0", "--eval_iters", "1", "--device", "cpu", "--out_dir", tmp_path / "ft"])
    pre, got = res["model"].state_dict(), ft["model"].state_dict()
    assert got.keys() == pre.keys() and all(torch.equal(got[k], pre[k]) for k in pre)  # the pretrained base
    assert ft["model"].config.n_head == 2 and ft["model"].config.block_size == 64


# ---- train_gpt2.py, flags: every bad value is one line before anything is loaded or trained


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "error: --batch_size 0: must be >= 1"),
    (["--grad_accum", "0"], "error: --grad_accum 0: must be >= 1"),
    (["--n_head", "3"], "error: --n_embd 32 is not divisible by --n_head 3"),
    (["--beam", "0"], "error: --beam 0: must be >= 1"),
    (["--lr", "-0.001"], "error: --lr -0.001: must be >= 0"),
    (["--max_iters", "-1"], "error: --max_iters -1: must be >= 0"),
    (["--block_size", "36"], "error: --block_size 36 is too short: the longest test MR takes 35 tokens, "
                             "+ --max_new_tokens 8 = 43"),  # "name : Blue Spice | food : Italian" + EOS, bytes
    (["--lora_r", "0"], "error: --method lora: LoRA: r=0"),
    (["--block_size", "24"], "error: no training example fits in 24 tokens (--max_len 512, --block_size 24)"),
    (["--targets", "nope"], "error: --method lora: LoRA: target 'nope' matches no nn.Linear"),
    (["--resume", "--overwrite"], "error: --resume and --overwrite: pass one of them"),
])
def test_gpt2_bad_flags_fail_before_training(tmp_path, flags, message):
    _gpt2_write_e2e(tmp_path)
    msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora", *flags))
    assert msg.startswith(message), msg
    assert not (tmp_path / "out" / "adapter.safetensors").exists()


def test_gpt2_method_config_error_is_one_line(tmp_path):
    _gpt2_write_e2e(tmp_path)
    msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "sera", "--sera_r", "8", "--sera_split", "3"))
    assert msg.startswith("error: --method sera: ") and "split=3" in msg
    args = train_gpt2.get_args(["--method", "sera", "--sera_r", "4"])
    assert args.sera_split is None and common.METHODS["sera"][0](args).split == 4  # split = r by default


@pytest.mark.parametrize("mr", ["", "   ", " | ", ", "])
def test_gpt2_empty_sample_is_refused_before_any_file_is_read(monkeypatch, mr):
    monkeypatch.setattr(train_gpt2, "fetch_all", lambda *a, **k: pytest.fail("a file was read"))
    with pytest.raises(SystemExit) as e:
        train_gpt2.main(["--sample", mr, "--adapter", "nowhere/adapter.safetensors"])
    assert str(e.value.code) == f'error: --sample {mr!r} is an empty MR; give one such as "name[The Eagle] | food[French]"'


# ---- model_gpt2.py, decoding


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
        got = model_gpt2.beam_search(model, prompts, eos=3, beam=1, max_new_tokens=12, no_repeat_ngram=no_repeat)
        assert got == [_gpt2_greedy(model, p, 3, 12, no_repeat) for p in prompts]


def test_gpt2_batched_beam_equals_per_prompt_beam():
    model = _gpt2_tiny()
    prompts = [[5, 6, 7], [1], [9, 8, 7, 6, 5, 4, 3, 2], [2, 2, 11, 12, 13]]
    batched = model_gpt2.beam_search(model, prompts, eos=3, beam=3, max_new_tokens=10, no_repeat_ngram=3)
    single = [model_gpt2.beam_search(model, [p], eos=3, beam=3, max_new_tokens=10, no_repeat_ngram=3)[0]
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
    free = model_gpt2.beam_search(model, prompts, eos=3, beam=2, max_new_tokens=20, no_repeat_ngram=0)
    assert all(_gpt2_has_repeat(t, 4) for t in free)  # without the rule this model loops
    for beam in (1, 3):
        out = model_gpt2.beam_search(model, prompts, eos=3, beam=beam, max_new_tokens=20, no_repeat_ngram=4)
        assert all(len(t) == 20 and not _gpt2_has_repeat(t, 4) for t in out)


class _Markov(nn.Module):
    """A stand-in language model: the next token's logits are row w of `logp` after token w (no cache)."""

    def __init__(self, logp):
        super().__init__()
        self.logp = nn.Parameter(logp, requires_grad=False)  # (V, V)
        self.config = SimpleNamespace(block_size=64)
        self.transformer = SimpleNamespace(h=[])

    def forward(self, idx, pos=None, mask=None, cache=None):
        return self.logp[idx[:, -1:]], None  # (N, 1, V): the last position only, as GPT gives it


def test_gpt2_beam_bans_repeats_before_the_softmax():
    # Tokens: 0 EOS, 1 a, 2 c, 5 the prompt. After 5: a 0.6, c 0.4; after a: a 0.9, EOS 0.1; after c: EOS.
    # Beam 2, no repeat of a bigram. Step 1 keeps "a a" (log .54) and "c EOS" (finished, log .4 / 2^0.8).
    # Step 2 bans a after "a a" (the bigram "a a" exists). Banned on the logits, EOS renormalises to 1:
    #   "a a EOS" = log .54 / 3^0.8 = -0.256 beats "c EOS" = log .4 / 2^0.8 = -0.526.
    # Banned after the softmax, EOS keeps log .1: "a a EOS" = log .054 / 3^0.8 = -1.212 loses to "c EOS".
    logp = torch.full((6, 6), -30.0, dtype=torch.float64)  # e^-30: every other token is as good as impossible
    logp[5, 1], logp[5, 2] = math.log(0.6), math.log(0.4)
    logp[1, 1], logp[1, 0] = math.log(0.9), math.log(0.1)
    logp[2, 0] = 0.0
    logp[0, 0] = logp[3, 0] = logp[4, 0] = 0.0
    model = _Markov(logp)
    assert math.log(0.54) / 3 ** 0.8 > math.log(0.4) / 2 ** 0.8 > math.log(0.054) / 3 ** 0.8
    assert model_gpt2.beam_search(model, [[5]], eos=0, beam=2, max_new_tokens=5, no_repeat_ngram=2) == [[1, 1]]
    # without the ban a repeats to the end: log(.6 * .9^4) / 5^0.8 = -0.257, live after max_new_tokens
    assert model_gpt2.beam_search(model, [[5]], eos=0, beam=2, max_new_tokens=5, no_repeat_ngram=0) == [[1] * 5]


def test_gpt2_beam_divides_by_the_length_to_the_penalty():
    # Tokens: 0 EOS, 1 a, 2 c, 3 b, 4 d; prompts 5 and 6. c -> EOS; a -> b -> d -> EOS. Penalty 0.8:
    # after 5, c .6, a .4: "c EOS" log .6 / 2^0.8 = -0.2934 beats "a b d EOS" log .4 / 4^0.8 = -0.3023;
    # after 6, c .55, a .45: "a b d EOS" log .45 / 4^0.8 = -0.2634 beats "c EOS" log .55 / 2^0.8 = -0.3434
    logp = torch.full((7, 7), -30.0, dtype=torch.float64)
    logp[5, 2], logp[5, 1], logp[6, 2], logp[6, 1] = math.log(0.6), math.log(0.4), math.log(0.55), math.log(0.45)
    logp[2, 0] = logp[1, 3] = logp[3, 4] = logp[4, 0] = logp[0, 0] = 0.0
    assert math.log(0.6) / 2 ** 0.8 > math.log(0.4) / 4 ** 0.8 and math.log(0.45) / 4 ** 0.8 > math.log(0.55) / 2 ** 0.8
    assert model_gpt2.beam_search(_Markov(logp), [[5], [6]], eos=0, beam=2, max_new_tokens=6, length_penalty=0.8,
                                  no_repeat_ngram=0) == [[2], [1, 3, 4]]


def test_gpt2_beam_needs_a_new_token():
    with pytest.raises(ValueError, match="max_new_tokens 0: must be >= 1"):
        model_gpt2.beam_search(_gpt2_tiny(), [[5, 6]], eos=3, beam=2, max_new_tokens=0)


# ---- e2e.py, metrics against hand computations


def test_gpt2_bleu_by_hand():
    hyp = "the cat sat on the mat"
    # MR 1: exact match with ref 1: 1-4-gram matches 6/6, 5/5, 4/4, 3/3; closest ref length 6.
    # MR 2: refs "the cat is on the mat" / "there is a cat on the mat"; clipped matches:
    #   1g the x2, cat, on, mat = 5/6; 2g "the cat", "on the", "the mat" = 3/5; 3g "on the mat" = 1/4;
    #   4g 0/3; closest ref length 6 (ref 1). Corpus: 11/12, 8/10, 5/8, 3/6, lengths 12 vs 12 -> BP 1.
    refs = [[hyp, "a cat was on a mat"], ["the cat is on the mat", "there is a cat on the mat"]]
    bleu, _ = e2e.bleu_nist([hyp, hyp], refs)
    assert bleu == pytest.approx((11 / 12 * 8 / 10 * 5 / 8 * 3 / 6) ** 0.25, abs=1e-12)
    # brevity: hyp length 3, closest ref 6 -> BP exp(1 - 6/3); p1..p3 = 1; no 4-gram at all: mteval counts p4 = 1
    bleu, _ = e2e.bleu_nist(["the cat sat"], [["the cat sat on the mat", "the cat sat on a red mat"]])
    assert bleu == pytest.approx(math.exp(-1.0), abs=1e-12)
    # tie in distance (lengths 2 and 4 around 3): the shorter is taken, so no brevity penalty
    bleu, _ = e2e.bleu_nist(["a b c"], [["a b", "a b c d"]])
    assert bleu == pytest.approx(1.0, abs=1e-12)
    # the closest reference (7 words), not the shortest (2): BP exp(1 - 7/5), every precision 1
    bleu, _ = e2e.bleu_nist(["a b c d e"], [["a b", "a b c d e f g"]])
    assert bleu == pytest.approx(math.exp(1 - 7 / 5), abs=1e-12)  # 0.670320
    # tokenisation: case and punctuation (split off, except inside numbers) do not matter
    bleu, _ = e2e.bleu_nist(["The Cat, costs 2.50."], [["the cat , costs 2.50 ."]])
    assert bleu == pytest.approx(1.0, abs=1e-12)
    # a 4-gram precision of 0 is smoothed to 1/(2 * count): MR 2 alone, (5/6 * 3/5 * 1/4 * 1/6)^(1/4)
    bleu, _ = e2e.bleu_nist([hyp], refs[1:])
    assert bleu == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, abs=1e-12)
    # two precisions without a match: 1/(2 * 3) for 3-grams, then 1/(4 * 2) for 4-grams (the factor doubles)
    bleu, _ = e2e.bleu_nist(["a b x y z"], [["a b c d e"]])
    assert bleu == pytest.approx((2 / 5 * 1 / 4 * 1 / (2 * 3) * 1 / (4 * 2)) ** 0.25, abs=1e-12)  # 0.21364


def test_gpt2_nist_by_hand():
    # one ref "a b": info(a) = info(b) = log2(2 words / 1) = 1, info(a b) = log2(count(a) / count(a b)) = 0
    _, nist = e2e.bleu_nist(["a b"], [["a b"]])
    assert nist == pytest.approx(1.0, abs=1e-12)  # (1 + 1) / 2 unigrams + 0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    for refs in (["a b"], ["a b", ""]):  # 1 / 1, length ratio 1/2; an empty reference is no reference
        _, nist = e2e.bleu_nist(["a"], [refs])
        assert nist == pytest.approx(math.exp(-beta * math.log(0.5) ** 2), abs=1e-12)  # 0.131905
    # reference words 2 + 6 + 2 = 10 over the mean references per MR (3 / 2): 20/3 words, ratio 4 / (20/3) = 0.6;
    # info(a) = info(b) = log2(10 / 3), info(a b) = log2(3 / 3) = 0
    _, nist = e2e.bleu_nist(["a b", "a b"], [["a b", "a b c d e f"], ["a b"]])
    assert nist == pytest.approx(math.log2(10 / 3) * math.exp(-beta * math.log(0.6) ** 2), abs=1e-12)
    # an n-gram's information is log2(count(its first n-1 words) / count(n-gram)): ref "a b c b" has 4 words,
    # a once, b twice, so info(a) = 2, info(b) = 1, info(a b) = log2(1 / 1) = 0; unigrams (2 + 1) / 2, ratio 1/2
    _, nist = e2e.bleu_nist(["a b"], [["a b c b"]])
    assert nist == pytest.approx(1.5 * math.exp(-beta * math.log(0.5) ** 2), abs=1e-12)  # 0.19786


def test_gpt2_rouge_meteor_cider_by_hand():
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4: P 4/6, R 4/5
    f = lambda p, r: (1 + 1.44) * p * r / (r + 1.44 * p)
    assert e2e.rouge_l(["the cat sat on the mat"], [["the cat on a mat"]]) == pytest.approx(f(4 / 6, 4 / 5))
    # a second reference "cat" raises the max recall to 1 while the max precision stays 4/6 (taken separately)
    got = e2e.rouge_l(["the cat sat on the mat"], [["the cat on a mat", "cat"]])
    assert got == pytest.approx(f(4 / 6, 1.0))
    assert e2e.rouge_l(["The cat sat."], [["the cat sat"]]) == pytest.approx(1.0)  # punctuation dropped

    assert e2e.meteor_exact(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    # P = R = 1, 2 chunks of 4 matches: 1 - 0.6 * (2/4)^0.2
    assert e2e.meteor_exact(["a b c d"], [["c d a b"]]) == pytest.approx(1 - 0.6 * 0.5 ** 0.2)
    # 2 of 3 words, one chunk: Fmean = (4/9) / (2/3) = 2/3, penalty 0.6 * (1/2)^0.2
    got = e2e.meteor_exact(["the cat sat"], [["the cat ran", "dogs"]])
    assert got == pytest.approx(2 / 3 * (1 - 0.6 * 0.5 ** 0.2))
    # P = 1, R = 1/3: Fmean = P R / (0.85 P + 0.15 R) = (1/3) / 0.9; one chunk of 2 matches
    got = e2e.meteor_exact(["the cat"], [["the cat sat on the mat"]])
    assert got == pytest.approx(1 / 3 / 0.9 * (1 - 0.6 * 0.5 ** 0.2), abs=1e-12)  # 0.17691

    refs = [["a b c d"], ["e f g h"]]
    assert e2e.cider_d(["a b c d", "e f g h"], refs) == pytest.approx(10.0)  # identical, 1-4-grams
    assert e2e.cider_d(["x y z w", "v u t s"], refs) == 0.0
    assert 0 < e2e.cider_d(["a b c d x", "e f g h"], refs) < 10.0
    # every n-gram has idf log(2 / 1); MR 1 "a b c d e f g h i j" against "a b c d": cosines 4 / (sqrt(10) 2),
    # 3 / (sqrt(9) sqrt(3)), 2 / (sqrt(8) sqrt(2)), 1 / sqrt(7); 9 against 3 bigrams: exp(-6^2 / (2 * 6^2)); MR 2: 10
    got = e2e.cider_d(["a b c d e f g h i j", "e f g h"], refs)
    mr1 = 10 / 4 * (2 / math.sqrt(10) + 1 / math.sqrt(3) + 1 / 2 + 1 / math.sqrt(7)) * math.exp(-0.5)
    assert got == pytest.approx((mr1 + 10) / 2, abs=1e-12)  # 6.5829
    # repeats count and are clipped: "a b a b" has a, b twice and "a b" twice, each clipped to the reference's once:
    # unigrams 2 / (sqrt(8) sqrt(2)), bigrams ("a b" 2, "b a" 1) 1 / (sqrt(5) 1), no 3- or 4-gram in the reference;
    # 3 against 1 bigrams: exp(-2^2 / 72)
    got = e2e.cider_d(["a b a b", "c d"], [["a b"], ["c d"]])
    mr1 = 10 / 4 * (1 / 2 + 1 / math.sqrt(5)) * math.exp(-4 / 72)
    assert got == pytest.approx((mr1 + 10 / 4 * 2) / 2, abs=1e-12)  # 3.6200


# ---- e2e.py, metrics against the official scorers


# Five MRs of the E2E test set (testset_w_refs.csv) with all their references, and two sets of outputs: SHORT,
# mostly shorter than the references (NIST's length penalty at work), and LONG, longer, with repeated n-grams.
_E2E_REFS = [
    [
        "A coffee shop in the city centre area called Blue Spice.",
        "Blue Spice is a coffee shop in city centre.",
    ],
    [
        "Burger King is near the coffee shop Blue Spice which has an average customer rating.",
        "The Blue Spice coffee shop near Burger King has good customer ratings with excellent food and service, "
        "with a lovely atmosphere.",
        "Average customer rating coffee shop include Blue Spice near Burger King.",
        "The Blue Spice coffee shop located near Burger King has been rated average by customers.",
        "Located near Burger King is a coffee shop named Blue Spice that has an average customer rating.",
        "Near Burger King is a coffee shop called Blue Spice which has an average customer rating.",
        "Near Burger King is the Blue Spice coffee shop.  It has average customer ratings.",
    ],
    [
        "Crowne Plaza Hotel has a pub nearby with an average customer rating called Blue Spice.",
    ],
    [
        "coffee shop located near Café Sicilia called Cocum with a high customer rating",
        "Near Café Sicilia is a high rated coffee shop called Cocum",
        "coffee shop Cocum has a high customer rating and is located near Café Sicilia.",
        "There is a coffee shop named Cocum located near Café Sicilia. The customer rating is high.",
        "For a coffee shop with high customer rating near Café Sicilia, try Cocum.",
        "There is a high rated coffee shop named Cocum near Café Sicilia.",
    ],
    [
        "For Italian food in a kids friendly environment, try The Waterman pub. Priced between £20-25, it can be "
        "found in the riverside area near Raja Indian Cuisine.",
        "A reasonably priced between £20 - 25 Italian pub called The Waterman is located in the riverside area near "
        "Raja Indian Cuisine.",
        "The Waterman is an Italian pub. It is kids-friendly with a price range of £20 - 25. It is situated near "
        "the Raja Indian Cuisine establishment in the riverside area.",
        "The kids friendly pub The Waterman offers Italian food at prices between £20-25. It is located near Raja "
        "Indian Cuisine in the riverside area.",
    ],
]
_E2E_SHORT = [
    "Blue Spice is a coffee shop in the city centre.",
    "Blue Spice is a coffee shop near Burger King.",
    "Blue Spice is a pub near Crowne Plaza Hotel.",
    "Cocum is a coffee shop near Café Sicilia.",
    "The Waterman is an Italian pub near Raja Indian Cuisine. It is kids friendly.",
]
_E2E_LONG = [
    "Blue Spice is a coffee shop in the city centre. Blue Spice is a coffee shop in the city centre area.",
    "Blue Spice is a coffee shop near Burger King with an average customer rating. Blue Spice is a coffee shop with "
    "an average customer rating near Burger King.",
    "Blue Spice is a pub near Crowne Plaza Hotel with an average customer rating. It is a pub near Crowne Plaza "
    "Hotel.",
    "Cocum is a coffee shop near Café Sicilia with a high customer rating. Cocum is a high rated coffee shop near "
    "Café Sicilia.",
    "The Waterman is an Italian pub in the riverside area near Raja Indian Cuisine. It is kids friendly and has a "
    "price range of £20-25. The Waterman is a kids friendly pub.",
]


# Expected values from the official scorers on these inputs, never from e2e.py:
# - BLEU, NIST: mteval-v13a-sig.pl of tuetschek/e2e-metrics (perl 5.36, XML::Twig 3.52), on the SGML files that
#   its measure_scores.py writes (references padded with empty ones to 7 per MR); its last printf widened
#   from 4 to 10 digits. Printed as it ships: SHORT 0.5039 / 2.7843, LONG 0.4492 / 4.4998.
# - CIDEr-D, ROUGE-L: pycocoevalcap 1.2 (PyPI) Cider and Rouge, whose formulas are e2e-metrics' copy line for
#   line, fed e2e.coco_tokenize's tokens joined by spaces, so the formulas alone are compared (on these sentences
#   the Stanford PTB tokenizer's tokens give the same scores).
@pytest.mark.parametrize("hyps, bleu, nist, cider, rouge", [
    (_E2E_SHORT, 0.503862412, 2.7842890835, 2.7041356490737356, 0.5712075903824447),
    (_E2E_LONG, 0.4492096354, 4.4998482978, 0.9688905977514433, 0.5466082801645926),
], ids=["short", "long"])
def test_gpt2_scores_equal_the_official_scorers(hyps, bleu, nist, cider, rouge):
    assert e2e.bleu_nist(hyps, _E2E_REFS) == pytest.approx((bleu, nist), abs=1e-9)
    assert e2e.cider_d(hyps, _E2E_REFS) == pytest.approx(cider, abs=1e-9)
    assert e2e.rouge_l(hyps, _E2E_REFS) == pytest.approx(rouge, abs=1e-9)


# ---- common.py and e2e.py, offline and first run: one probe, one message naming every missing resource and its flag


def test_gpt2_offline_names_every_missing_resource_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))  # whatever this machine has cached
    probes = []
    monkeypatch.setattr(common, "network_ok", lambda *a, **k: probes.append(1) or False)

    def fail(*a, **k):
        raise AssertionError("a download was tried although the probe said offline")
    monkeypatch.setattr(tiktoken, "get_encoding", fail)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fail))

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
        e2e.get_tokenizer(str(tmp_path))


# tiktoken names a cached file by the sha1 of its URL (tiktoken.load.read_file_cached)
_TIKTOKEN_GPT2_URLS = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                       "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]


@pytest.mark.parametrize("env", ["TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"])
def test_gpt2_bpe_in_tiktokens_cache_trains_offline_without_a_probe(monkeypatch, tmp_path, env):
    """A user who ran once online has the BPE in tiktoken's cache: offline, the run uses it and never probes."""
    import hashlib
    cache = tmp_path / "cache"
    cache.mkdir()
    for url in _TIKTOKEN_GPT2_URLS:
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_text("x")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv(env, str(cache))
    monkeypatch.setattr(common, "network_ok", lambda *a, **k: pytest.fail("the network was probed"))
    got = []
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: got.append(name) or _gpt2_enc())  # reads the cache
    _gpt2_write_e2e(tmp_path)
    argv = _gpt2_argv(tmp_path, tmp_path / "out", "lora", "--max_iters", "1", "--eval_samples", "1")
    res = train_gpt2.main([str(a) for a in argv])
    assert got == ["gpt2"] and res["step"] == 1 and len(res["predictions"]) == 1
    # one file short of the pair: the probe decides, and offline the message names --bpe_dir
    os.remove(cache / hashlib.sha1(_TIKTOKEN_GPT2_URLS[1].encode()).hexdigest())
    probes = []
    monkeypatch.setattr(common, "network_ok", lambda *a, **k: probes.append(1) or False)
    with pytest.raises(SystemExit, match="(?s)no network .*vocab.bpe, encoder.json.*--bpe_dir"):
        train_gpt2.main([str(a) for a in argv] + ["--overwrite"])
    assert probes == [1] and got == ["gpt2"]


def test_gpt2_explicit_bpe_dir_is_used_without_a_download(monkeypatch, tmp_path):

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
    enc = e2e.get_tokenizer(str(tmp_path))
    assert read == [(str(tmp_path / "vocab.bpe"), str(tmp_path / "encoder.json"))]
    assert enc.encode_ordinary("ab") == [97, 98] and enc.eot_token == 50256


# ---- train_gpt2.py end to end, every method; its adapter.safetensors reloads with load_finetuned


def _gpt2_fresh(method):
    """The smoke run's model rebuilt by hand as main builds it (seed 1), with the same adapter config."""
    torch.manual_seed(1)
    model = model_gpt2.GPT(model_gpt2.GPTConfig(block_size=128, vocab_size=257, n_layer=1, n_head=2, n_embd=32))
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
    assert "decode 2/2 MRs | elapsed 0:0" in log and "| eta 0:00:00" in log  # progress while decoding
    assert res["step"] == (0 if method == "none" else 2)
    assert all(math.isfinite(v) for v in res["scores"].values()) and len(res["predictions"]) == 2
    assert (out / "predictions.txt").read_text(encoding="utf-8").count("\n") == 2
    assert (out / "references.txt").read_text(encoding="utf-8") == (  # LoRA's completions, grouped by MR
        "Blue Spice serves French food .\nBlue Spice , a French place , is nice .\n\n"
        "Blue Spice serves Italian food .\nBlue Spice , a Italian place , is nice .\n")

    blob = _read_adapter(out / "adapter.safetensors")
    assert blob["args"]["method"] == method and blob["args"]["n_embd"] == 32
    sd = blob["adapter"]
    fresh, trained = _gpt2_fresh(method), res["model"].eval()
    reloaded = train_gpt2.load_finetuned(str(out / "adapter.safetensors"))  # one call instead of the lines below
    x = torch.randint(0, 257, (2, 9))
    y = torch.zeros_like(x)
    with torch.no_grad():
        before = fresh(x, y)[0]
        if method in common.METHODS:
            common.METHODS[method][3](fresh, sd)
        else:
            fresh.load_state_dict(sd, strict=False)
        assert_close(fresh(x, y)[0], trained(x, y)[0])
        assert_close(reloaded(x, y)[0], trained(x, y)[0])
        if method != "none":
            assert (before - trained(x, y)[0]).abs().max() > 1e-4  # training moved it; the reload matters
        if method == "full":  # a full fine-tune reloads as a checkpoint with its own n_head (not n_embd / 64 = 0)
            again = model_gpt2.load_gpt2(str(out / "adapter.safetensors")).eval()
            assert again.config.n_head == 2
            assert_close(again(x, y)[0], trained(x, y)[0])
    mrs = ["name : Blue Spice | food : French", "name : Blue Spice | food : Italian"]  # LoRA's form, by hand
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
    assert [res["sample"]] == _gpt2_decode(run.res["model"], _gpt2_enc(), ["name : Blue Spice | food : French"])
    msg = _gpt2_error(["--sample", "name[A]", "--adapter", run.folder / "nope.pt"])
    assert msg.startswith("error: --sample needs an adapter: no ")


# ---- common.py through train_gpt2.py: output directories, checkpoints and resume


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
    msg = _gpt2_error(argv + ["--lr", "2e-4"])  # else it would train on at the saved run's lr
    assert msg.startswith("error: --resume: --lr 0.01 -> 0.0002 would alter the saved run; only --beam")
    msg = _gpt2_error(argv + ["--seed", "9", "--lora_r", "8"])  # else a new scratch base from seed 9
    assert "--lora_r 4 -> 8, --seed 1 -> 9 would alter" in msg
    res = _gpt2_main(argv + ["--max_iters", "6", "--eval_samples", "0", "--log_interval", "3"])  # extend: allowed
    assert res["step"] == 6
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    del ckpt["args"]["seed"]  # a flag the saved run did not have is one that changes
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"--resume: --seed None -> 1 would alter"):
        train_gpt2.main([str(a) for a in argv + ["--seed", "1"]])


def test_gpt2_resume_with_other_shapes_is_one_line(_gpt2_lora_run, tmp_path):
    argv = _gpt2_copy(_gpt2_lora_run, tmp_path) + ["--resume"]
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    name = next(k for k in ckpt["trainable"] if k.endswith("lora_A"))
    ckpt["trainable"][name] = torch.zeros(3, 32)  # else a RuntimeError traceback from load_state_dict
    torch.save(ckpt, tmp_path / "out" / "ckpt.pt")
    msg = _gpt2_error(argv)
    assert msg.startswith(f"error: --resume: {tmp_path / 'out' / 'ckpt.pt'} does not fit this model: ") and name in msg


@pytest.mark.parametrize("content, message", [
    (b"", "is an empty file, not a checkpoint"),
    (b"truncated", "is not a readable checkpoint (truncated or not a torch file): "),
    (None, "is not a nanopeft ckpt.pt: no step, trainable, optimizer, rng"),
])
def test_gpt2_bad_checkpoint_file_is_one_line(_gpt2_lora_run, tmp_path, content, message):
    argv = _gpt2_copy(_gpt2_lora_run, tmp_path) + ["--resume"]
    path = tmp_path / "out" / "ckpt.pt"
    if content is None:  # a torch file with the wrong content
        torch.save({"args": {}}, path)
    else:  # empty or truncated
        path.write_bytes(path.read_bytes()[:100] if content == b"truncated" else content)
    assert _gpt2_error(argv).startswith(f"error: {path} {message}")
    with pytest.raises(SystemExit, match=f"error: {re.escape(str(path))} is (an empty file|not a)"):
        train_gpt2.load_finetuned(str(path))


@pytest.mark.parametrize("script", [train_gpt2, train_vit], ids=lambda m: m.__name__)
def test_save_atomic_fsyncs_the_file_before_the_rename(script, tmp_path, monkeypatch):
    """Both scripts: the file reaches the disk before it replaces the old one, then the folder entry does."""
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or replace(a, b))
    path = str(tmp_path / "ckpt.pt")
    script.save_atomic({"x": torch.ones(2)}, path)
    assert events == [("fsync", path + ".tmp"), ("replace", path + ".tmp"), ("fsync", str(tmp_path))]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2)) and not os.path.exists(path + ".tmp")


class _Gpt2Stop(Exception):
    pass


def test_gpt2_resume_continues_the_same_run(tmp_path, monkeypatch):
    _gpt2_write_e2e(tmp_path)
    flags = ["--grad_accum", "2", "--warmup_iters", "10", "--eval_samples", "0"]  # 6 batches/epoch: crosses one
    straight = _gpt2_main(_gpt2_argv(tmp_path, tmp_path / "a", "lora", *flags, "--max_iters", "4"))
    save_atomic = common.save_atomic

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


def test_gpt2_torchrun_two_processes_give_the_one_process_adapter(tmp_path):
    # 2 processes x --grad_accum 1 == 1 process x --grad_accum 2: the same global batches, the same gradients,
    # VB-LoRA's bank (one parameter shared by every layer) included
    _gpt2_write_e2e(tmp_path)
    argv = lambda out, *x: _gpt2_argv(tmp_path, tmp_path / out, "vblora", "--max_iters", "3", "--eval_iters", "1",
                                      "--beam", "1", "--eval_samples", "1", *x)
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
    assert a.keys() == b.keys() and "vblora_bank.vectors" in a
    for k in a:
        assert_close(b[k], a[k])
    init = dict(_gpt2_fresh("vblora").named_parameters())
    assert any((a[k] - init[k]).abs().max() > 0 for k in a)  # it trained


# ================================================================================================
# ViT: model_vit.py, images.py, train_vit.py
# ================================================================================================
# -------------------------------------------------------------------------------------------------
# helpers: a tiny ViT under Google/HF names, a plain reference forward, tiny data, tiny runs

_VIT_TINY = dict(n_layer=2, n_embd=32, n_head=2, patch=4, image=16, mlp=64, classes=5)


def _vit_fake_hf_state(prefix="vit.", classifier=True, L=_VIT_TINY["n_layer"], D=_VIT_TINY["n_embd"],
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


def _vit_save_hf_dir(tmp_path, sd, n_head=_VIT_TINY["n_head"]):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"num_attention_heads": n_head, "layer_norm_eps": 1e-12,
                                               "hidden_act": "gelu", "model_type": "vit"}))
    return d


def _vit_write_npz(path, n_train=16, n_test=8, side=16, classes=4, seed=0, **override):
    g = np.random.default_rng(seed)
    arrays = dict(x_train=g.integers(0, 256, (n_train, side, side, 3), dtype=np.uint8), y_train=np.arange(n_train) % classes,
                  x_test=g.integers(0, 256, (n_test, side, side, 3), dtype=np.uint8), y_test=np.arange(n_test) % classes,
                  class_names=np.array([f"c{i}" for i in range(classes)]))
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def _vit_smoke_argv(tmp_path, method, *extra):
    """A 3-step run of a 1-block scratch ViT on 16 random 16x16 images (4 classes)."""
    npz = tmp_path / "data.npz"
    if not npz.exists():
        _vit_write_npz(str(npz))
    return ["--method", method, "--init_from", "scratch", "--n_layer", "1", "--n_embd", "64", "--n_head", "2",
            "--patch_size", "4", "--image_size", "16", "--data", str(npz), "--max_iters", "3", "--batch_size", "4",
            "--eval_batch_size", "5", "--log_interval", "1", "--vblora_b", "32", "--lr", "1e-2",
            "--out_dir", str(tmp_path / "out"), "--device", "cpu", *extra]


def _vit_exit(argv):
    """main(argv) must stop with one message; return it."""
    with pytest.raises(SystemExit) as e:
        train_vit.main(argv)
    return str(e.value)


# -------------------------------------------------------------------------------------------------
# model_vit.py: model and pretrained weights


@pytest.mark.parametrize("prefix", ["vit.", ""])
def test_vit_hf_checkpoint_maps_key_for_key(tmp_path, prefix):
    sd = _vit_fake_hf_state(prefix)
    d = _vit_save_hf_dir(tmp_path, sd)
    model = model_vit.build_model(_vit_args("--init_from", str(d), "--image_size", "16"), _VIT_TINY["classes"])
    assert model.cfg.n_layer == 2 and model.cfg.n_embd == 32 and model.cfg.patch_size == 4
    assert model.cfg.n_head == 2 and model.cfg.mlp_dim == 64
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_close(model.eval()(x), _vit_reference_logits(sd, x, n_head=2, prefix=prefix))


def test_vit_checkpoint_without_classifier_gets_zero_head_and_other_grid(tmp_path):
    sd = _vit_fake_hf_state(classifier=False)
    d = _vit_save_hf_dir(tmp_path, sd)
    model = model_vit.build_model(_vit_args("--init_from", str(d), "--image_size", "32"), 7)
    assert model.pos_embed.shape == (1, 8 * 8 + 1, 32)  # 4x4 grid interpolated to 8x8
    assert_close(model.pos_embed[0, 0], sd["vit.embeddings.position_embeddings"][0, 0])
    assert torch.equal(model.head.weight, torch.zeros(7, 32))
    assert_close(model.blocks[1].attn.v_proj.weight, sd["vit.encoder.layer.1.attention.attention.value.weight"])


def test_vit_resize_pos_embed_keeps_a_constant_grid():
    pos = torch.cat([torch.full((1, 1, 6), -3.0), torch.full((1, 9, 6), 2.5)], dim=1)  # 3x3 grid
    out = model_vit.resize_pos_embed(pos, 25)
    assert out.shape == (1, 26, 6)
    assert_close(out[:, 0], pos[:, 0])
    assert_close(out[:, 1:], torch.full((1, 25, 6), 2.5))


def test_vit_checkpoint_mismatch_lists_every_problem(tmp_path):
    sd = _vit_fake_hf_state()
    sd["vit.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(65, 32)
    del sd["vit.encoder.layer.1.layernorm_after.bias"]
    sd["vit.encoder.layer.0.extra.weight"] = torch.zeros(1)
    model = model_vit.ViT(model_vit.ViTConfig(16, 4, 2, 2, 32, 64, 5))
    with pytest.raises(ValueError) as e:
        model_vit.load_weights(model, model_vit.hf_to_vit(sd))
    msg = str(e.value)
    assert "blocks.0.mlp.fc1.weight: checkpoint (65, 32) vs model (64, 32)" in msg
    assert "blocks.1.ln_2.bias" in msg and "encoder.layer.0.extra.weight" in msg


def test_vit_every_linear_is_called_as_a_module():
    """No Linear (q/k/v/out, mlp, head) is bypassed through its .weight, so an adapter swapped in is used."""
    model = model_vit.ViT(model_vit.ViTConfig(16, 4, 2, 2, 32, 64, 5))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    called = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, inp, out, name=name: called.add(name))
    model(torch.randn(2, 3, 16, 16))
    assert called == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} and "head" in called
    nn.init.normal_(model.head.weight)  # zero at init: nothing upstream would show
    lora.apply_lora(model, lora.LoRAConfig(r=2, dropout=0.0), ["q_proj", "v_proj", "fc1", "head"])
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # a non-zero update on any one target must change the logits
            with torch.no_grad():
                p.fill_(0.1)
            assert not torch.allclose(model(x), before), n
            with torch.no_grad():
                p.zero_()


def test_vit_hub_failure_names_the_repo_and_local_flags(monkeypatch):

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(SystemExit) as e:
        model_vit.read_checkpoint("vit-large")
    assert "google/vit-large-patch16-224-in21k" in str(e.value) and "--init_from PATH" in str(e.value)
    assert "--init_from scratch" in str(e.value)


def test_vit_full_finetune_reloads_with_its_saved_n_head(tmp_path):
    # n_embd 64 with 2 heads: a reload guessing n_embd // 64 = 1 head would give other logits
    res = train_vit.main(_vit_smoke_argv(tmp_path, "full", "--init_from", "scratch"))
    model = res["model"].eval()
    assert model.cfg.n_head == 2
    path = str(tmp_path / "out" / "adapter.safetensors")
    x = torch.randn(3, 3, 16, 16)
    rebuilt = model_vit.build_model(_vit_args("--init_from", path, "--image_size", "16"), 4)
    rebuilt.head.load_state_dict(model.head.state_dict())
    reloaded = train_vit.load_finetuned(path)
    assert rebuilt.cfg.n_head == 2 and reloaded.cfg.n_head == 2
    with torch.no_grad():
        assert_close(rebuilt.eval()(x), model(x))
        assert_close(reloaded(x), model(x))


# -------------------------------------------------------------------------------------------------
# images.py: preprocessing


def test_vit_eval_preprocess_normalises_to_unit_range():
    x = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(3 * 8 * 8).view(2, 3, 8, 8)
    out = images.preprocess(x, 8, train=False)
    assert out.shape == (2, 3, 8, 8)
    assert torch.equal(out[0], torch.full((3, 8, 8), -1.0)) and torch.equal(out[1], torch.full((3, 8, 8), 1.0))
    big = images.preprocess(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), 24, train=False)
    assert big.shape == (4, 3, 24, 24) and big.min() >= -1 and big.max() <= 1


def test_vit_train_crop_size_range_and_flip():
    x = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    out = images.preprocess(x, 20, train=True)
    assert out.shape == (6, 3, 20, 20) and out.min() >= -1 and out.max() <= 1
    img = torch.rand(1, 3, 8, 8).expand(64, -1, -1, -1)
    same = images.random_resized_crop_flip(img, 8, min_scale=1.0, ratio=(1, 1), flip=False)
    assert_close(same, img.contiguous())  # the whole image at its own size: identity
    out = images.random_resized_crop_flip(img, 8, min_scale=1.0, ratio=(1, 1))
    flipped = [bool(torch.allclose(o, img[0].flip(-1), atol=1e-6)) for o in out]
    kept = [bool(torch.allclose(o, img[0], atol=1e-6)) for o in out]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_vit_train_crop_is_a_subwindow():
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(16, 3, 32, 32)  # value = x position
    out = images.random_resized_crop_flip(ramp, 32, min_scale=0.25, ratio=(1, 1), flip=False)
    span = out[:, 0, 0, -1] - out[:, 0, 0, 0]  # a box of side s spans about s of the ramp
    assert (span > 0.4).all() and (span < 1.0 + 1e-6).all()
    assert (out[:, :, 1:] - out[:, :, :1]).abs().max() < 1e-6  # no vertical change: rows stay rows


def test_vit_train_crop_is_fixed_by_its_generator():
    x = torch.rand(4, 3, 12, 12)
    a = images.random_resized_crop_flip(x, 8, generator=torch.Generator().manual_seed(3))
    b = images.random_resized_crop_flip(x, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# -------------------------------------------------------------------------------------------------
# images.py: loading, and every bad input refused before training


def test_vit_npz_loading(tmp_path):
    p = str(tmp_path / "d.npz")
    _vit_write_npz(p)
    raw = np.load(p)
    d = images.load_npz(p, 32)  # 16 <= 32: kept at its own size
    assert d["x_train"].shape == (16, 3, 16, 16) and d["x_train"].dtype == torch.uint8
    assert torch.equal(d["x_train"][3], torch.from_numpy(raw["x_train"][3]).permute(2, 0, 1))
    assert d["y_test"].dtype == torch.int64 and d["y_test"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert d["classes"] == ["c0", "c1", "c2", "c3"]
    small = images.load_npz(p, 8)  # larger than the model input: resized once
    assert small["x_test"].shape == (8, 3, 8, 8)


def test_vit_npz_without_its_suffix_is_read_by_content(tmp_path):
    _vit_write_npz(str(tmp_path / "d.npz"))
    os.rename(tmp_path / "d.npz", tmp_path / "cifar.data")
    d = images.load_data(_vit_args("--data", str(tmp_path / "cifar.data"), "--image_size", "16"))
    assert d["x_train"].shape == (16, 3, 16, 16) and d["classes"] == ["c0", "c1", "c2", "c3"]


_VIT_BAD_NPZ = {  # case -> (arrays to override (None: drop), what the message must say)
    "longer_y": (dict(y_train=np.arange(20) % 4), "x_train holds 16 images but y_train 20 labels"),
    "missing_keys": (dict(y_train=None, x_test=None), "missing y_train, x_test"),
    "label_past_classes": (dict(y_test=np.array([0, 1, 2, 4, 0, 1, 2, 3])), "y_test holds labels 0..4, but there are 4"),
    "negative_label": (dict(y_train=np.arange(16) % 4 - 1), "labels must be 0..3"),
    "class_names_too_few": (dict(class_names=np.array(["a", "b"])), "y_train holds labels 0..3, but there are 2 classes"),
    "empty_split": (dict(x_test=np.zeros((0, 16, 16, 3), np.uint8), y_test=np.zeros(0, np.int64)), "the test split is empty"),
    "float_labels": (dict(y_train=np.arange(16) % 4 * 1.0), "y_train must be a 1-D array of integer labels"),
}


@pytest.mark.parametrize("case", list(_VIT_BAD_NPZ))
def test_vit_bad_npz_is_one_error_line(tmp_path, case):
    override, expected = _VIT_BAD_NPZ[case]
    p = str(tmp_path / "bad.npz")
    _vit_write_npz(p, **override)
    with pytest.raises(SystemExit) as e:
        images.load_data(_vit_args("--data", p, "--image_size", "16"))
    msg = str(e.value)
    assert msg.startswith(f"error: --data {p}: ") and expected in msg and "\n" not in msg, msg


def test_vit_data_that_is_no_npz_nor_folder_is_refused_clearly(tmp_path):
    p = tmp_path / "images.csv"
    p.write_text("x,y\n1,2\n")
    with pytest.raises(SystemExit, match=r"neither an \.npz archive nor a folder; expected a \.npz holding x_train"):
        images.load_data(_vit_args("--data", str(p)))
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(SystemExit, match="one array, not an .npz archive"):
        images.load_npz(str(tmp_path / "one.npy"), 16)


def _vit_image_folder(root, splits=("train", "test"), classes=("cat", "dog")):
    for split in splits:
        for c in classes:
            os.makedirs(root / split / c)
            Image.new("RGB", (8, 8), (255, 0, 0)).save(root / split / c / "0.png")


def test_vit_image_folder_loading(tmp_path):
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, sizes in (("train", [(10, 14), (20, 20), (7, 9)]), ("test", [(16, 16)])):
        for c, rgb in colours.items():
            os.makedirs(tmp_path / split / c)
            for i, (w, h) in enumerate(sizes):
                Image.new("RGB", (w, h), rgb).save(tmp_path / split / c / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    d = images.load_folder(str(tmp_path), 12)
    assert d["classes"] == ["cat", "dog"]
    assert d["x_train"].shape == (6, 3, 12, 12) and d["x_train"].dtype == torch.uint8
    assert d["y_train"].tolist() == [0, 0, 0, 1, 1, 1] and d["y_test"].tolist() == [0, 1]
    assert (d["x_train"][0, 0] == 255).all() and (d["x_train"][0, 2] == 0).all()  # solid red survives resizing
    assert (d["x_test"][1, 2] == 255).all() and (d["x_test"][1, 0] == 0).all()


def test_vit_image_folder_hidden_entries_are_not_classes(tmp_path):
    _vit_image_folder(tmp_path)
    for split in ("train", "test"):
        os.makedirs(tmp_path / split / ".ipynb_checkpoints")
        (tmp_path / split / ".DS_Store").write_text("")
    (tmp_path / "train" / "cat" / ".hidden.png").write_bytes(b"not a png")
    d = images.load_folder(str(tmp_path), 8)
    assert d["classes"] == ["cat", "dog"] and d["y_train"].tolist() == [0, 1]


@pytest.mark.parametrize("layout, expected", [("no_test", "no test/ in this folder"),
                                              ("flat", "no train/ and no test/ in this folder"),
                                              ("flat_splits", "train/ holds no class subfolders"),
                                              ("empty_class", "the test split is empty")])
def test_vit_image_folder_bad_layout_says_the_expected_one(tmp_path, layout, expected):
    if layout == "no_test":
        _vit_image_folder(tmp_path, splits=("train",))
    elif layout == "flat":
        Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    elif layout == "flat_splits":
        for split in ("train", "test"):
            os.makedirs(tmp_path / split)
            Image.new("RGB", (8, 8)).save(tmp_path / split / "0.png")
    else:
        _vit_image_folder(tmp_path, splits=("train",))
        os.makedirs(tmp_path / "test" / "cat")
    with pytest.raises(SystemExit) as e:
        images.load_folder(str(tmp_path), 8)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg
    if layout != "empty_class":
        assert "train/<class>/ and test/<class>/" in msg


def test_vit_missing_dataset_names_the_local_flag(monkeypatch):
    datasets = pytest.importorskip("datasets")  # in requirements.txt; absent only on a bare GPU box

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SystemExit) as e:
        images.load_hub("pets", 224)  # the probe said yes, then the download broke off
    assert "timm/oxford-iiit-pet" in str(e.value) and "--data PATH" in str(e.value)
    assert "the download broke off: ConnectionError: no network" in str(e.value)
    with pytest.raises(SystemExit, match="the dataset timm/oxford-iiit-pet .*the Hugging Face Hub.*--data PATH"):
        images.load_hub("pets", 224, online=lambda: False)  # offline: `datasets` is not even asked


def test_vit_dataset_error_that_is_not_the_network_says_what_failed(monkeypatch):
    datasets = pytest.importorskip("datasets")  # in requirements.txt; absent only on a bare GPU box

    def script(*a, **k):
        try:
            raise KeyError("builder")
        except KeyError as inner:
            raise RuntimeError("Dataset scripts are no longer supported, but found FGVC-Aircraft.py") from inner
    monkeypatch.setattr(datasets, "load_dataset", script)
    with pytest.raises(SystemExit) as e:
        images.load_hub("fgvc", 224)
    msg = str(e.value)
    assert "RuntimeError: Dataset scripts are no longer supported" in msg and "--data PATH" in msg
    assert "broke off" not in msg


def test_vit_hub_dataset_picks_image_and_label_columns(monkeypatch):
    datasets = pytest.importorskip("datasets")  # in requirements.txt; absent only on a bare GPU box

    def split(n, sizes):
        feats = datasets.Features({"family": datasets.ClassLabel(names=["x", "y"]), "image": datasets.Image(),
                                   "variant": datasets.ClassLabel(names=["a", "b", "c"])})
        return datasets.Dataset.from_dict({"family": [i % 2 for i in range(n)],
                                           "image": [Image.new("RGB", sizes[i % 2], (10 * i, 0, 0)) for i in range(n)],
                                           "variant": [(i + 1) % 3 for i in range(n)]}, features=feats)
    dd = datasets.DatasetDict({"train": split(6, [(40, 30), (50, 50)]), "validation": split(2, [(20, 20)] * 2)})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, **kw: asked.append((repo, kw)) or dd)
    d = images.load_hub("fgvc", 24)  # label column "variant", test falls back to the validation split
    assert asked == [("HuggingFaceM4/FGVC-Aircraft", {"revision": images.DATASETS["fgvc"][2]})]  # parquet, pinned
    assert d["classes"] == ["a", "b", "c"] and d["y_train"].tolist() == [1, 2, 0, 1, 2, 0]
    assert d["x_train"].shape == (6, 3, 24, 24) and d["x_test"].shape == (2, 3, 20, 20)
    assert d["x_train"][3, 0].eq(30).all() and d["y_test"].tolist() == [1, 2]


def test_vit_offline_run_names_everything_it_could_not_reach(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")  # in requirements.txt; absent only on a bare GPU box

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(common, "network_ok", lambda *a, **k: True)  # the probe passes, the downloads fail
    msg = _vit_exit(["--init_from", "vit-base", "--dataset", "cifar10", "--out_dir", str(tmp_path / "out")])
    lines = msg.splitlines()
    assert lines[0] == "error: a download failed; these could not be fetched:" and len(lines) == 3
    assert "google/vit-base-patch16-224-in21k" in lines[1] and "--init_from PATH" in lines[1]
    assert "--init_from scratch" in lines[1] and "broke off" in lines[1]
    assert "uoft-cs/cifar10" in lines[2] and "--data PATH" in lines[2]


# -------------------------------------------------------------------------------------------------
# train_vit.py: flags, every bad one refused, one line each, before any data is read


@pytest.mark.parametrize("flags, expected", [
    (["--batch_size", "0"], "error: --batch_size 0: must be >= 1"),
    (["--grad_accum", "0"], "error: --grad_accum 0: must be >= 1"),
    (["--n_head", "3"], "error: --n_head 3 must divide --n_embd 64"),
    (["--lr", "-0.001"], "error: --lr -0.001: must be >= 0"),
    (["--max_iters", "-5"], "error: --max_iters -5: must be >= 0"),
    (["--patch_size", "5"], "error: --patch_size 5 must divide --image_size 16"),
    (["--resume", "--overwrite"], "error: --resume and --overwrite: pass one"),
    (["--method", "sera", "--sera_r", "6", "--sera_split", "4"], "error: --method sera: SeRA: split=4 must divide r=6"),
])
def test_vit_bad_flags_fail_before_training(tmp_path, monkeypatch, flags, expected):
    monkeypatch.setattr(train_vit, "load_data", lambda args: pytest.fail("data read before the flags were checked"))
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora", *flags))
    assert msg.startswith(expected) and "\n" not in msg, msg


def test_vit_bad_flags_are_all_named_at_once(tmp_path):
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora", "--batch_size", "0", "--n_head", "3"))
    assert msg.splitlines() == ["error: --batch_size 0: must be >= 1", "error: --n_head 3 must divide --n_embd 64"]


def test_vit_global_batch_larger_than_the_data_is_refused(tmp_path):
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora", "--batch_size", "8", "--grad_accum", "3"))
    assert msg == "error: --batch_size 8 x --grad_accum 3 x 1 process(es) = 24 images per step, more than the 16 training images"


def test_vit_bad_method_config_exits_with_the_constraint(tmp_path):
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "vblora", "--vblora_b", "48"))
    assert "--method vblora" in msg and "48" in msg


# -------------------------------------------------------------------------------------------------
# train_vit.py: training runs, every method, the log line, reload


@pytest.mark.parametrize("method", list(train_vit.METHOD_DEFAULTS))
def test_vit_smoke_every_method_trains_saves_and_reloads(tmp_path, capsys, method):
    res = train_vit.main(_vit_smoke_argv(tmp_path, method))
    out = capsys.readouterr().out
    assert "test accuracy" in out and 0.0 <= res["test_acc"] <= 1.0
    assert ("step 3/3" in out) == (method != "none")
    assert "trainable parameters without the head" in out
    if method != "none":  # the shared log line: ETA and elapsed as H:MM:SS
        assert re.search(r"^step 3/3 \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| [\d,]+ img/s \| "
                         r"elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d$", out, re.M), out
    model = res["model"].eval()
    path = tmp_path / "out" / "adapter.safetensors"
    assert path.exists() and (tmp_path / "out" / "ckpt.pt").exists()
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert set(common.CKPT_KEYS) <= set(ck) and "model" not in ck
    x = images.preprocess(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), 16, train=False)
    reloaded = train_vit.load_finetuned(str(path))
    with torch.no_grad():
        assert_close(reloaded(x), model(x))
        # the adapter matters: the same backbone with only the trained head gives other logits
        torch.manual_seed(0)
        bare = model_vit.build_model(train_vit.get_args(_vit_smoke_argv(tmp_path, "head")), 4)
        bare.head.load_state_dict(model.head.state_dict())
        differs = not torch.allclose(bare.eval()(x), model(x), atol=1e-6)
    assert differs == (method not in ("none", "head"))


def test_vit_hms():
    assert [common.hms(s) for s in (0, 59.9, 61, 3600 * 27 + 62)] == ["0:00:00", "0:00:59", "0:01:01", "27:01:02"]


def _vit_torchrun(argv, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train_vit.py", *argv]
    r = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(train_vit.__file__)), env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def test_vit_torchrun_two_processes_match_one(tmp_path):
    """DDP on CPU (gloo): 2 processes with --grad_accum 1 take the steps of 1 process with --grad_accum 2,
    VB-LoRA's shared bank included (its gradient is all-reduced like any other)."""
    argv = _vit_smoke_argv(tmp_path, "vblora", "--min_crop", "0.3")
    train_vit.main(argv + ["--grad_accum", "2", "--out_dir", str(tmp_path / "one")])
    out = _vit_torchrun(argv + ["--grad_accum", "1", "--out_dir", str(tmp_path / "two")], nproc=2)
    assert out.count("step 3/3 |") == 1  # only rank 0 logs
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert two["world_size"] == 2 and one["step"] == two["step"] == 3
    assert one["trainable"].keys() == two["trainable"].keys() and "vblora_bank.vectors" in one["trainable"]
    for k in one["trainable"]:
        assert_close(two["trainable"][k], one["trainable"][k])
    a1 = _read_adapter(tmp_path / "one" / "adapter.safetensors")
    a2 = _read_adapter(tmp_path / "two" / "adapter.safetensors")
    for k in a1["adapter"]:
        assert_close(a2["adapter"][k].double(), a1["adapter"][k].double(), torch.float32)


# -------------------------------------------------------------------------------------------------
# common.py through train_vit.py: resume, overwrite, bad files, atomic saves


def test_vit_resume_continues_from_the_checkpoint(tmp_path, capsys):
    train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--max_iters", "2"))
    capsys.readouterr()
    train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--max_iters", "3", "--resume", "--log_interval", "5",
                                   "--eval_interval", "1", "--eval_batch_size", "3"))
    out = capsys.readouterr().out
    assert "at step 2" in out and "step 3/3" in out and "step 1/" not in out
    ck = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "sera", "--resume"))
    assert "--method lora -> sera" in msg


class _VitStop(Exception):
    pass


def test_vit_resume_after_an_interruption_matches_a_straight_run(tmp_path, monkeypatch):
    # 16 images / batch 4: epoch 1 ends (and saves) at step 4 of 8; dropout draws from the global RNG
    argv = ["--max_iters", "8", "--min_crop", "0.3", "--lora_dropout", "0.2"]
    straight = train_vit.main(_vit_smoke_argv(tmp_path, "lora", *argv, "--out_dir", str(tmp_path / "a")))
    save_atomic, saved = common.save_atomic, []

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
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["trainable"]
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["trainable"]
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert straight["test_acc"] is not None


def test_vit_resume_refuses_changed_flags_and_names_them(tmp_path):
    train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--max_iters", "1"))
    # a new seed would rebuild the scratch backbone from it: another model, silently
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora", "--seed", "9", "--lr", "2e-2", "--resume"))
    assert msg.startswith("error: --resume: ") and "\n" not in msg
    assert "--lr 0.01 -> 0.02" in msg and "--seed 0 -> 9" in msg and "--max_iters" in msg and "--epochs" in msg
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora", "--targets", "q_proj", "--resume"))
    assert "--targets q_proj,v_proj -> q_proj" in msg
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora", "--weight_decay", "0", "--resume"))
    assert "--weight_decay 0.0001 -> 0.0" in msg
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora", "--n_head", "4", "--sera_split", "2", "--resume"))
    assert "--n_head 2 -> 4" in msg and "--sera_split None -> 2" in msg


def test_vit_resume_with_other_tensors_in_the_checkpoint_is_one_line(tmp_path):
    train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--max_iters", "1"))
    path = tmp_path / "out" / "ckpt.pt"
    ck = torch.load(path, weights_only=True)
    k = next(k for k in ck["trainable"] if "lora_A" in k)
    ck["trainable"][k] = torch.zeros(3, 3)
    torch.save(ck, path)
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora", "--resume"))
    assert msg.startswith(f"error: --resume: {path} does not fit this model") and "\n" not in msg
    del ck["trainable"][k]
    torch.save(ck, path)
    assert "only in this run" in _vit_exit(_vit_smoke_argv(tmp_path, "lora", "--resume"))


def test_vit_existing_run_is_not_replaced_without_a_flag(tmp_path):
    first = train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--max_iters", "1"))
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora"))
    assert msg == (f"error: {tmp_path / 'out' / 'ckpt.pt'} exists; pass --resume to continue that run or "
                   f"--overwrite to start over")
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["step"] == 1  # untouched
    os.remove(tmp_path / "out" / "ckpt.pt")  # the adapter alone is a finished run too
    assert "adapter.safetensors exists" in _vit_exit(_vit_smoke_argv(tmp_path, "lora"))
    res = train_vit.main(_vit_smoke_argv(tmp_path, "lora", "--overwrite"))
    assert res["step"] == 3 and first["step"] == 1


def _vit_bad_file(path, kind):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "truncated":
        torch.save({"args": {}, "step": 1, "trainable": {"w": torch.zeros(1000)}, "optimizer": {}, "rng": {}}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "no_keys":
        torch.save({"weights": torch.zeros(2)}, path)


@pytest.mark.parametrize("kind, expected", [("empty", "is an empty file, not a checkpoint"),
                                            ("text", "is not a readable checkpoint (truncated or not a torch file)"),
                                            ("truncated", "is not a readable checkpoint (truncated or not a torch file)"),
                                            ("no_keys", "is not a nanopeft ckpt.pt: no args, step, trainable")])
def test_vit_bad_checkpoint_file_is_one_line(tmp_path, kind, expected):
    os.makedirs(tmp_path / "out")
    path = tmp_path / "out" / "ckpt.pt"
    _vit_bad_file(path, kind)
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora", "--resume"))
    assert msg.startswith(f"error: {path} {expected}") and "\n" not in msg, msg


def test_vit_bad_init_from_file_is_one_line(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x00" * 10)
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "lora", "--init_from", str(path)))
    assert msg.startswith(f"error: --init_from {path}: not a readable checkpoint") and "\n" not in msg


def test_vit_offline_fails_within_seconds_with_one_message(monkeypatch, tmp_path):
    probes = []
    monkeypatch.setattr(common, "network_ok", lambda *a, **k: probes.append(1) or False)

    def download(repo, filename, local_files_only=False, **k):
        assert local_files_only, "a download was tried although the probe said offline"
        raise FileNotFoundError("not in the cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *a, **k: pytest.fail("datasets.load_dataset called although the probe said offline")))
    t0 = time.time()
    msg = _vit_exit(["--method", "lora", "--out_dir", str(tmp_path / "out")])
    assert time.time() - t0 < 5 and probes == [1]
    lines = msg.splitlines()
    assert lines[0] == "error: no network (could not reach huggingface.co); these could not be fetched:", msg
    assert len(lines) == 3 and "google/vit-base-patch16-224-in21k" in lines[1] and "--init_from scratch" in lines[1]
    assert "uoft-cs/cifar10" in lines[2] and "--data PATH" in lines[2]


def test_vit_classes_subset_is_relabelled_in_the_order_given():
    assert images.parse_classes("5-7,2") == [5, 6, 7, 2]
    data = {"classes": ["a", "b", "c", "d"], "x_train": torch.arange(8).view(8, 1), "y_train": torch.tensor([0, 1, 2, 3] * 2),
            "x_test": torch.arange(4).view(4, 1), "y_test": torch.tensor([3, 2, 1, 0])}
    out = images.select_classes(data, [3, 1], "test data")
    assert out["classes"] == ["d", "b"]
    assert out["y_train"].tolist() == [1, 0, 1, 0] and out["x_train"].view(-1).tolist() == [1, 3, 5, 7]
    assert out["y_test"].tolist() == [0, 1] and out["x_test"].view(-1).tolist() == [0, 2]
    with pytest.raises(SystemExit, match=r"^error: --classes: test data has 4 classes \(0..3\), not 4$"):
        images.select_classes(data, [0, 4], "test data")
    for bad, why in (("3-1", "not an index or a range"), ("a", "not an index or a range"), ("1,0-2", "listed twice")):
        with pytest.raises(SystemExit, match=rf"^error: --classes {bad}: .*{why}"):
            train_vit.get_args(["--classes", bad])


def test_vit_init_from_a_full_run_keeps_its_head_only_for_the_same_classes(tmp_path):
    npz = tmp_path / "data.npz"
    g = np.random.default_rng(0)
    np.savez(npz, x_train=g.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8), y_train=np.arange(16) % 4,
             x_test=g.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), y_test=np.arange(8) % 4,
             class_names=np.array(["c0", "c1", "c2", "c3"]))
    common = ["--image_size", "16", "--data", str(npz), "--batch_size", "4", "--log_interval", "1", "--device", "cpu"]
    base = train_vit.main(["--method", "full", "--init_from", "scratch", "--n_layer", "1", "--n_embd", "32", "--n_head",
                           "2", "--patch_size", "4", "--classes", "0-1", "--max_iters", "2", "--lr", "1e-2",
                           "--out_dir", str(tmp_path / "base"), *common])
    assert base["model"].head.weight.abs().sum() > 0 and base["model"].head.out_features == 2
    pt = str(tmp_path / "base" / "adapter.safetensors")
    for classes, keeps_head in (("2,3", False), ("0,1", True)):
        r = train_vit.main(["--method", "none", "--init_from", pt, "--classes", classes,
                            "--out_dir", str(tmp_path / classes), *common])
        pre, got = base["model"].state_dict(), r["model"].state_dict()
        assert all(torch.equal(got[k], pre[k]) for k in pre if not k.startswith("head."))
        assert torch.equal(got["head.weight"], pre["head.weight"]) == keeps_head
        assert keeps_head or not got["head.weight"].any()  # fresh: zero-initialised


@pytest.mark.parametrize("method, edit, why", [
    ("lora", lambda c: c.update(n_head=3), "n_head=3 must divide n_embd=32"),
    ("full", lambda c: c.update(n_layer=10 ** 6), "parameters; expected at most"),  # 10⁶ × 32 × (4 × 32 + 2 × 128)
    ("full", lambda c: c.update(foo=1), "unexpected keyword argument 'foo'"),
    ("full", lambda c: c.update(n_embd=64), "size mismatch"),
], ids=["n_head", "huge", "unknown_field", "n_embd"])
def test_vit_edited_header_config_is_one_line(tmp_path, method, edit, why):
    npz = tmp_path / "data.npz"
    g = np.random.default_rng(0)
    np.savez(npz, x_train=g.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), y_train=np.arange(8) % 2,
             x_test=g.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), y_test=np.arange(4) % 2,
             class_names=np.array(["c0", "c1"]))
    train_vit.main(["--method", method, "--init_from", "scratch", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
                    "--patch_size", "4", "--image_size", "16", "--data", str(npz), "--batch_size", "4", "--max_iters",
                    "1", "--device", "cpu", "--out_dir", str(tmp_path / "run")])
    path = tmp_path / "edited.safetensors"
    _rewrite_header(tmp_path / "run" / "adapter.safetensors", path, lambda m: edit(m["config"]))
    with pytest.raises(SystemExit) as e:
        train_vit.load_finetuned(str(path))
    msg = str(e.value.code)
    assert msg.startswith(f"error: {path}: its header's config") and why in msg and "\n" not in msg, msg


# ================================================================================================
# interop.py: PEFT's folder format in and out, a plain-LoRA export; against Hugging Face PEFT itself
# ================================================================================================
# Every test compares logits (fp32, atol 1e-5), never "it loaded": PEFT loads some broken files without a word (LoRA
# keys without .weight, a VB-LoRA bank under another key).
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
ATOL = 1e-5


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   vocab_size=100, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _logits(model):
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def _fill(model, keys=lora.ADAPTER_PREFIXES, std=0.05, seed=1):
    """Random non-zero values in every adapter tensor (names containing a part starting with `keys`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(part.startswith(keys) for part in n.split(".")):
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "logits" in n else std))


def _peft(base, folder):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


def _snapshot(model):  # what a refused load must leave as it was: modules, tensors, what trains, hooks
    return ([type(m) for m in model.modules()], [p.requires_grad for p in model.parameters()],
            len(model._forward_pre_hooks) + len(model._forward_hooks), {k: v.clone() for k, v in model.state_dict().items()})


def _unchanged(model, snap):
    *same, sd = _snapshot(model)
    return same == list(snap[:3]) and sd.keys() == snap[3].keys() and all(torch.equal(sd[k], snap[3][k]) for k in sd)


class _Outer(nn.Module):
    """A forker's method that interop.py does not know: a .base and delta_weight(), ΔW = u v^T."""
    def __init__(self, base):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.base, self.u, self.v = base, torch.randn(base.out_features, generator=g), torch.randn(base.in_features,
                                                                                                    generator=g) / 8

    def forward(self, x):
        return self.base(x) + (x @ self.v)[..., None] * self.u

    def delta_weight(self):
        return torch.outer(self.u, self.v)


OURS = {  # nanopeft methods on the tiny Llama's nn.Linears; b = 16 divides 64 and 128
    "lora": lambda m: lora.apply_lora(m, lora.LoRAConfig(r=4, alpha=8), ["q_proj", "v_proj"]),
    "lora_ranks": lambda m: (lora.apply_lora(m, lora.LoRAConfig(r=4, alpha=8), ["q_proj"]),
                             lora.apply_lora(m, lora.LoRAConfig(r=2, alpha=5), ["up_proj"])),
    "sera": lambda m: sera.apply_sera(m, sera.SeRAConfig(r=8, split=4, alpha=16), ["q_proj", "up_proj"]),
    "siva": lambda m: siva.apply_siva(m, siva.SiVAConfig(perc=0.9), ["q_proj", "v_proj"]),
    "vblora": lambda m: vblora.apply_vblora(m, vblora.VBLoRAConfig(r=4, b=16, h=32, k=2), ["q_proj", "down_proj"]),
    "bone_col": lambda m: bone.apply_bone(m, bone.BoneConfig(b=16), ["q_proj", "up_proj"]),
    "bone_unconstrained": lambda m: bone.apply_bone(m, bone.BoneConfig(b=16, variant="unconstrained"),
                                                    ["q_proj", "up_proj"]),
    "bone_row": lambda m: bone.apply_bone(m, bone.BoneConfig(b=16, grouping="row"), ["q_proj", "up_proj"]),
    "bone_hadamard": lambda m: bone.apply_bone(m, bone.BoneConfig(b=16, variant="hadamard"), ["q_proj"]),
    "outer": lambda m: setattr(m.model.layers[1].mlp, "up_proj", _Outer(m.model.layers[1].mlp.up_proj)),
}


def _ours(base, method, seed=1):
    model = copy.deepcopy(base)
    OURS[method](model)
    _fill(model, seed=seed)
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "lora_ranks", "vblora", "bone_col", "bone_unconstrained"])
def test_save_peft_loads_in_peft(llama, tmp_path, method):
    ours = _ours(llama, method)
    head = {"weight": torch.randn(100, 64, generator=torch.Generator().manual_seed(2)) * 0.1}
    with torch.no_grad():
        ours.lm_head.weight.copy_(head["weight"])  # a retrained head, shipped as modules_to_save
    interop.save_peft(ours, tmp_path, modules_to_save={"lm_head": head})
    want = _logits(ours)
    torch.testing.assert_close(_logits(_peft(llama, tmp_path)), want, atol=ATOL, rtol=0)
    plain = copy.deepcopy(llama)
    names = interop.load_peft(plain, tmp_path)  # and back: the same adapters and the same head
    assert names == [n for n, _ in interop._adapters(ours)]
    torch.testing.assert_close(_logits(plain), want, atol=ATOL, rtol=0)


PEFT_CONFIGS = {  # adapters made by PEFT itself
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora_rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"up_proj": 2},
                                           target_modules=["q_proj", "up_proj"]),  # scales 8 / √4, 8 / √2
    "lora_patterns": lambda: peft.LoraConfig(r=4, lora_alpha=8, rank_pattern={"v_proj": 2, "layers.1": 3},
                                             alpha_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj"]),
    "vblora": lambda: peft.VBLoRAConfig(r=4, num_vectors=32, vector_length=16, topk=2,
                                        target_modules=["q_proj", "down_proj"]),
    "vblora_k_is_h": lambda: peft.VBLoRAConfig(r=4, num_vectors=2, vector_length=16, topk=2,
                                               target_modules=["q_proj", "down_proj"]),
    "vblora_topk": lambda: peft.VBLoRAConfig(r=4, num_vectors=256, vector_length=16, topk=3,
                                             save_only_topk_weights=True, target_modules=["q_proj", "down_proj"]),
    "miss_bat": lambda: peft.MissConfig(r=16, init_weights="bat", target_modules=["q_proj", "up_proj"]),
    "miss": lambda: peft.MissConfig(r=16, target_modules=["q_proj", "up_proj"]),
}


def _peft_made(base, kind, folder, seed=3):
    model = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[kind]())
    _fill(model, keys=("lora_", "vblora_", "miss_"), seed=seed)
    model.save_pretrained(str(folder))
    return model.eval()


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_load_peft_matches_peft(llama, tmp_path, kind):
    ref = _peft_made(llama, kind, tmp_path)
    if kind == "vblora_topk":  # PEFT's h = 256 files store int16 indices and k - 1 = 2 weights per sub-vector
        sd = load_file(tmp_path / "adapter_model.safetensors")
        assert {t.dtype for k, t in sd.items() if k.endswith("_topk_indices")} == {torch.int16}
        assert {t.shape[-1] for k, t in sd.items() if k.endswith("_topk_weights")} == {2}
        key = next(k for k in sd if k.endswith("_topk_weights"))
        sd[key][0, 0] = torch.tensor([0.75, 0.25])  # the reference: PEFT reads this row as 0.75, 0.25, 0
        save_file(sd, tmp_path / "adapter_model.safetensors")
        ref = _peft(llama, tmp_path)
        sd[key][0, 0] = torch.tensor([0.75, 0.2500005])  # rounding: sums to 1 + 5e-7 (PEFT's log(1 - Σ) is NaN)
        save_file(sd, tmp_path / "adapter_model.safetensors")
    ours = copy.deepcopy(llama)
    names = interop.load_peft(ours, tmp_path)
    assert len(names) == 4 and all(n.startswith("model.layers.") for n in names)
    torch.testing.assert_close(_logits(ours), _logits(ref), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["lora", "lora_ranks", "sera", "siva", "vblora", "bone_col", "bone_row", "outer"])
def test_save_lora_loads_in_peft(llama, tmp_path, method, capsys):
    ours = _ours(llama, method)
    inexact = method.startswith(("bone", "outer"))  # outer: the SVD at ΔW's numerical rank, 1
    errors = interop.save_lora(ours, tmp_path, rank=64 if method.startswith("bone") else None)  # Bone: exact at 64
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 1 or method != "outer"
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == cfg["r"] and not cfg["use_rslora"]
    assert all(cfg["alpha_pattern"][k] == r for k, r in cfg["rank_pattern"].items())  # scale 1 everywhere
    assert ("by SVD" in capsys.readouterr().out) == inexact
    assert max(errors.values()) < 1e-6
    torch.testing.assert_close(_logits(_peft(llama, tmp_path)), _logits(ours), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method, rank", [("bone_col", None), ("bone_row", None), ("lora", 2), ("sera", 3)])
def test_peft_save_lora_svd_error_is_the_true_error(llama, tmp_path, method, rank, capsys):
    ours = _ours(llama, method)
    errors = interop.save_lora(ours, tmp_path, rank=rank)
    line = capsys.readouterr().out
    m = re.fullmatch(r"save_lora: ΔW truncated to rank (\d+) by SVD: relative error up to (\S+) \((\S+)\)\n", line)
    assert m, line
    sd = load_file(tmp_path / "adapter_model.safetensors")
    true = {}
    for name, layer in interop._adapters(ours):
        A, B = sd[f"base_model.model.{name}.lora_A.weight"], sd[f"base_model.model.{name}.lora_B.weight"]
        dW = layer.delta_weight().detach()
        assert A.shape[0] == (rank or 16)
        true[name] = ((B @ A - dW).norm() / dW.norm()).item()
        assert abs(errors[name] - true[name]) < 1e-4
    worst = max(true, key=true.get)
    assert m[3] == worst and int(m[1]) == (rank or 16) and 0.01 < true[worst] < 1
    assert float(m[2]) == pytest.approx(true[worst], rel=5e-3)


def _gpt2_pair():
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                              n_positions=32)).eval()
    return hf, lambda: _our_gpt(hf)


def _our_gpt(hf):
    ours = model_gpt2.GPT(model_gpt2.GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=4, n_embd=64, dropout=0.0))
    ours.load_state_dict(model_gpt2.convert_hf_state_dict(hf.state_dict()))
    return ours.eval()


def _gpt_logits(model):
    with torch.no_grad():
        if isinstance(model, model_gpt2.GPT):
            return model.eval()(IDS)[0][:, -1]  # our GPT gives the last position only
        return model.eval()(input_ids=IDS).logits[:, -1]


def test_peft_fused_gpt2_lora(tmp_path):
    hf, fresh = _gpt2_pair()
    ours = fresh()
    torch.testing.assert_close(_gpt_logits(ours), _gpt_logits(hf), atol=ATOL, rtol=0)  # the same base model
    lora.apply_lora(ours, lora.LoRAConfig(r=4, alpha=8), ["q_proj", "v_proj", "mlp.c_fc"])
    _fill(ours)
    proj = ours.transformer.h[1].attn.c_proj
    with torch.no_grad():
        proj.weight.normal_(0, 0.1)  # a module trained whole; HF's Conv1D holds its weight as (in, out)
    conv1d = {"transformer.h.1.attn.c_proj": {"weight": proj.weight.T, "bias": proj.bias}}
    want = _gpt_logits(ours)
    for save in (interop.save_peft, interop.save_lora):
        folder = tmp_path / save.__name__
        save(ours, folder, layout=model_gpt2.gpt2_layout, modules_to_save=conv1d)
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["fan_in_fan_out"] and cfg["target_modules"] == sorted(
            f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc"))
        assert cfg["r"] == 8 and cfg["rank_pattern"] == {re.escape(f"transformer.h.{i}.mlp.c_fc"): 4 for i in range(2)}
        torch.testing.assert_close(_gpt_logits(_peft(hf, folder)), want, atol=ATOL, rtol=0)
        back = fresh()
        names = interop.load_peft(back, folder, layout=model_gpt2.gpt2_layout)
        assert names == [n for n, _ in interop._adapters(ours)]  # k_proj's zero part is skipped
        assert all(m.r == 4 for _, m in interop._adapters(back))  # each part keeps its own columns
        torch.testing.assert_close(_gpt_logits(back), want, atol=ATOL, rtol=0)


def test_peft_fused_gpt2_refusals_and_the_way_out(tmp_path):
    hf, fresh = _gpt2_pair()
    for apply, why in ((lambda m: vblora.apply_vblora(m, vblora.VBLoRAConfig(r=4, b=16, h=32), ["q_proj", "v_proj"]),
                        "zero sub-vectors"),
                       (lambda m: bone.apply_bone(m, bone.BoneConfig(b=16), ["mlp.c_fc"]), "fan_in_fan_out")):
        ours = fresh()
        apply(ours)
        _fill(ours)
        with pytest.raises(ValueError, match=f"{why}.*save_lora"):
            interop.save_peft(ours, tmp_path / "refused", layout=model_gpt2.gpt2_layout)
        assert not (tmp_path / "refused").exists()
        interop.save_lora(ours, tmp_path / "lora", rank=256, layout=model_gpt2.gpt2_layout)  # exact at these ranks
        torch.testing.assert_close(_gpt_logits(_peft(hf, tmp_path / "lora")), _gpt_logits(ours), atol=ATOL, rtol=0)


def test_load_peft_fused_vblora_gpt2(tmp_path):
    hf, fresh = _gpt2_pair()
    cfg = peft.VBLoRAConfig(r=4, num_vectors=32, vector_length=16, topk=2, target_modules=["c_attn"],
                            fan_in_fan_out=True)
    ref = peft.get_peft_model(copy.deepcopy(hf), cfg)
    _fill(ref, keys=("vblora_",), seed=4)
    ref.save_pretrained(str(tmp_path))
    ours = fresh()
    names = interop.load_peft(ours, tmp_path, layout=model_gpt2.gpt2_layout)
    assert len(names) == 6  # q, k and v of both layers: one logits_A, logits_B split in three
    torch.testing.assert_close(_gpt_logits(ours), _gpt_logits(ref), atol=ATOL, rtol=0)


def _vit_weights(hf, n_layer=2):
    """HF ViT weights (transformers >= 5 names) -> ours: renamed to the transformers 4 names by vit_layout's two
    forms, then hf_to_vit; so a wrong name in either form breaks the load (strict) or PEFT's (target not found)."""
    linears = [f"blocks.{i}.{m}" for i in range(n_layer) for m in model_vit._HF5_BLOCK]
    rename = {model_vit.vit_layout(n)[0]: model_vit.vit_layout(n, transformers4=True)[0] for n in linears}
    v4 = {}
    for k, v in hf.state_dict().items():
        module, _, param = k.rpartition(".")
        module = rename.get(module, re.sub(r"^vit\.layers\.", "vit.encoder.layer.", module))
        v4[f"{module}.{param}"] = v
    return model_vit.hf_to_vit(v4)


def test_peft_vit_layout_and_modules_to_save(tmp_path):
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=5)).eval()

    def fresh():
        m = model_vit.ViT(model_vit.ViTConfig(image_size=32, patch_size=8, n_layer=2, n_head=4, n_embd=64, mlp_dim=128, num_classes=5))
        m.load_state_dict(_vit_weights(hf))
        with torch.no_grad():
            m.head.weight.zero_()  # a new task's head, as fine-tuning starts it
            m.head.bias.zero_()
        return m.eval()

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = fresh()
    lora.apply_lora(ours, lora.LoRAConfig(r=4, alpha=8), ["q_proj", "v_proj", "out_proj", "fc1", "fc2"])
    _fill(ours)
    ours.eval()  # new LoRALinears start in training mode, their dropout on
    with torch.no_grad():
        ours.head.weight.normal_(0, 0.1)  # the trained head
        ours.head.bias.normal_(0, 0.1)
        want = ours(x)
    interop.save_lora(ours, tmp_path, layout=model_vit.vit_layout,
                      modules_to_save={"classifier": {"weight": ours.head.weight, "bias": ours.head.bias}})
    with torch.no_grad():
        got = _peft(hf, tmp_path)(pixel_values=x).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    back = fresh()
    assert len(interop.load_peft(back, tmp_path, layout=model_vit.vit_layout)) == 10
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, atol=ATOL, rtol=0)  # the head came back too


@pytest.mark.parametrize("method, why", [("sera", "PEFT has no such method"), ("siva", "PEFT has no such method"),
                                         ("bone_row", "Bone-row"), ("bone_hadamard", "hadamard"),
                                         ("mixed", "mixes"), ("none", "no nanopeft adapter"),
                                         ("outer", "PEFT has no such method")])
def test_save_peft_refuses(llama, tmp_path, method, why):
    if method == "mixed":
        model = _ours(llama, "lora")
        bone.apply_bone(model, bone.BoneConfig(b=16), ["up_proj"])
    else:
        model = copy.deepcopy(llama) if method == "none" else _ours(llama, method)
    with pytest.raises(ValueError, match=why) as e:
        interop.save_peft(model, tmp_path / "out")
    assert method == "none" or "save_lora" in str(e.value)
    assert not (tmp_path / "out").exists()


def _lora_key(layer=0, proj="q_proj", t="A"):
    return f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{t}.weight"


BAD = {  # a change to a good LoRA folder -> the error it must raise
    "unknown_type": (lambda c, sd: c.update(peft_type="IA3"), "peft_type 'IA3'"),
    "missing_key": (lambda c, sd: sd.pop(_lora_key(1, "v_proj", "B")),
                    re.escape(f"missing ['{_lora_key(1, 'v_proj', 'B')}']")),
    "extra_key": (lambda c, sd: sd.update({_lora_key(0, "k_proj", "C"): torch.zeros(4, 64)}),
                  "unexpected .*k_proj.lora_C"),
    "no_weight_suffix": (lambda c, sd: sd.update({_lora_key()[:-7]: sd.pop(_lora_key())}),
                         r"unexpected .*q_proj.lora_A'"),
    "wrong_shape": (lambda c, sd: sd.update({_lora_key(): torch.zeros(4, 32)}),
                    r"shape \(4, 32\), the model's is \(4, 64\)"),
    "wrong_rank": (lambda c, sd: c.update(r=8), r"shape \(4, 64\), the model's is \(8, 64\)"),
    "wrong_dtype": (lambda c, sd: sd.update({_lora_key(): torch.ones(4, 64, dtype=torch.int32)}), "torch.int32"),
    "dora": (lambda c, sd: c.update(use_dora=True), "use_dora"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_load_peft_refuses_bad_folder(llama, tmp_path, case):
    interop.save_peft(_ours(llama, "lora"), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    sd = load_file(tmp_path / "adapter_model.safetensors")
    change, why = BAD[case]
    change(cfg, sd)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(sd, tmp_path / "adapter_model.safetensors")
    model = copy.deepcopy(llama)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=why):
        interop.load_peft(model, tmp_path)
    assert _unchanged(model, snap)


@pytest.mark.parametrize("config, why", [
    (lambda: peft.MissConfig(r=16, init_weights="mini", mini_r=16, target_modules=["q_proj"]), "mini"),
    (lambda: peft.MissConfig(r=48, target_modules=["q_proj"]), r"b=48 must divide in_features=64"),
], ids=["mini", "padding"])
def test_load_peft_refuses_miss_forms(llama, tmp_path, config, why):
    peft.get_peft_model(copy.deepcopy(llama), config()).save_pretrained(str(tmp_path))
    model = copy.deepcopy(llama)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=why):
        interop.load_peft(model, tmp_path)
    assert _unchanged(model, snap)


def _edit_config(folder, **fields):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def test_load_peft_tied_head_in_modules_to_save_matches_peft(tmp_path):
    """GPT-2's lm_head is its wte: PEFT trains a copy of the head, so the input embedding keeps the base's."""
    hf, fresh = _gpt2_pair()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                          modules_to_save=["lm_head"])
    ref = peft.get_peft_model(copy.deepcopy(hf), cfg)
    _fill(ref, keys=("lora_", "modules_to_save"), std=0.1, seed=3)
    ref.save_pretrained(str(tmp_path))
    ours = fresh()
    interop.load_peft(ours, tmp_path, layout=model_gpt2.gpt2_layout)
    torch.testing.assert_close(_gpt_logits(ours), _gpt_logits(_peft(hf, tmp_path)), atol=ATOL, rtol=0)
    assert torch.equal(ours.transformer.wte.weight, hf.transformer.wte.weight)


SELECT = {  # an edit of a PEFT-made folder's config that selects fewer modules than the file holds tensors for
    "target_modules": dict(target_modules=["q_proj"]),
    "target_regex": dict(target_modules=r".*\.layers\.1\.self_attn\.[qv]_proj"),
    "layers_to_transform": dict(layers_to_transform=[1]),
    "layers_pattern": dict(layers_to_transform=0, layers_pattern="layers"),
    "exclude_modules": dict(exclude_modules=["up_proj", "model.layers.0.self_attn.v_proj"]),
}


@pytest.mark.parametrize("case", list(SELECT))
def test_load_peft_applies_only_the_modules_peft_selects(llama, tmp_path, case):
    model = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(r=4, lora_alpha=8,
                                                                      target_modules=["q_proj", "v_proj", "up_proj"]))
    _fill(model, keys=("lora_",), seed=3)
    model.save_pretrained(str(tmp_path))
    _edit_config(tmp_path, **SELECT[case])
    want = _logits(_peft(llama, tmp_path))
    assert (want - _logits(model)).abs().max() > 1e-3  # the edit leaves out modules that matter
    ours = copy.deepcopy(llama)
    interop.load_peft(ours, tmp_path)
    torch.testing.assert_close(_logits(ours), want, atol=ATOL, rtol=0)


SELECTION_NAMES = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                                     "self_attn.kv_proj", f"experts.{1 - i}.w1")]
SELECTION = [  # LoraConfig fields; PEFT's check_target_module_exists says which of SELECTION_NAMES + lm_head it picks
    dict(target_modules=["q_proj", "v_proj"], exclude_modules="q_proj"),  # a regex excludes by full match
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*\.0\..*"),
    dict(target_modules=["v_proj"], exclude_modules=["_proj"]),  # a name matches whole dotted segments
    dict(target_modules=["v_proj", "w1"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1]),  # full name: any layer
    dict(target_modules=["w1", "q_proj"], layers_to_transform=[1]),  # the layer is the first index, not the expert's
    dict(target_modules=["w1", "q_proj"], layers_to_transform=1, layers_pattern="experts"),
    dict(target_modules=["w1", "v_proj"], layers_to_transform=[0], layers_pattern=["h", "layers"]),
    dict(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head", "q"]),  # trained whole: no adapter
    dict(target_modules=["q_proj", "w1"], layers_to_transform=[]),  # no layer list: every layer
    dict(target_modules=r".*\.(\d)\.self_attn\.[qk]v?_proj"),
]


@pytest.mark.parametrize("fields", SELECTION)
def test_selected_is_pefts_check_target_module_exists(fields):
    cfg = {k: fields.get(k) for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                                      "modules_to_save")}
    names = SELECTION_NAMES + ["lm_head"]
    want = [bool(peft.tuners.tuners_utils.check_target_module_exists(peft.LoraConfig(**fields), n)) for n in names]
    assert [interop._selected(cfg, n) for n in names] == want and 0 < sum(want) < len(names)


def _huge_header(path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [10 ** 12], "data_offsets": [0, 4 * 10 ** 12]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 16)


def _retyped(dtype):
    def change(folder):
        sd = load_file(folder / "adapter_model.safetensors")
        sd[_lora_key()] = sd[_lora_key()].to(dtype)
        save_file(sd, folder / "adapter_model.safetensors")
    return change


FOLDER_FAULTS = {  # a fault in a PEFT-made folder -> (the file it names, what the one line must say)
    "config_not_json": (lambda f: (f / "adapter_config.json").write_text("{r: 4"), "adapter_config.json",
                        "not a JSON object"),
    "config_a_list": (lambda f: (f / "adapter_config.json").write_text("[4, 8]"), "adapter_config.json",
                      "holds a JSON list)"),
    "alpha_string": (lambda f: _edit_config(f, lora_alpha="8"), "adapter_config.json", "lora_alpha: LoRA: alpha='8'"),
    "alpha_null": (lambda f: _edit_config(f, lora_alpha=None), "adapter_config.json", "lora_alpha: LoRA: alpha=None"),
    "r_zero": (lambda f: _edit_config(f, r=0), "adapter_config.json", "r: LoRA: r=0 must be an int >= 1"),
    "rank_pattern_regex": (lambda f: _edit_config(f, rank_pattern={"q_proj[": 2}), "adapter_config.json",
                           "rank_pattern={'q_proj[': 2}: expected an object {module regex"),
    "bias_all": (lambda f: _edit_config(f, bias="all"), "adapter_config.json", "bias='all': expected 'none'"),
    "unknown_field": (lambda f: _edit_config(f, use_magic=True), "adapter_config.json", "['use_magic']: not fields"),
    "pissa": (lambda f: _edit_config(f, init_lora_weights="pissa"), "adapter_config.json", "init_lora_weights='pissa'"),
    "untargeted_module": (lambda f: _edit_config(f, target_modules=["q_proj", "v_proj", "k_proj"]),
                          "adapter_model.safetensors", "holds no tensors for ['model.layers.0.self_attn.k_proj'"),
    "weights_missing": (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter_model.safetensors",
                        "no such file"),
    "weights_empty": (lambda f: (f / "adapter_model.safetensors").write_bytes(b""), "adapter_model.safetensors",
                      "an empty file"),
    "weights_truncated": (lambda f: (f / "adapter_model.safetensors").write_bytes(
        (f / "adapter_model.safetensors").read_bytes()[:300]), "adapter_model.safetensors",
                          "not a readable safetensors"),
    "weights_huge_header": (lambda f: _huge_header(f / "adapter_model.safetensors"), "adapter_model.safetensors",
                            "not a readable safetensors"),
    "bool_tensor": (_retyped(torch.bool), "adapter_model.safetensors", "dtype torch.bool, expected a floating-point"),
    "complex_tensor": (_retyped(torch.complex64), "adapter_model.safetensors",
                       "dtype torch.complex64, expected a floating-point"),
    "no_config": (lambda f: (f / "adapter_config.json").unlink(), "adapter_model.safetensors",
                  "but no adapter_config.json"),
}


@pytest.mark.parametrize("case", list(FOLDER_FAULTS))
def test_load_peft_fault_is_one_line_naming_file_and_field(llama, tmp_path, case):
    _peft_made(llama, "lora", tmp_path)
    change, file, why = FOLDER_FAULTS[case]
    change(tmp_path)
    model = copy.deepcopy(llama)
    snap = _snapshot(model)
    with pytest.raises(ValueError) as e:
        interop.load_peft(model, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and file in msg and why in msg, msg
    assert _unchanged(model, snap)


def test_load_peft_miss_r_zero_is_one_line(llama, tmp_path):
    _peft_made(llama, "miss", tmp_path)
    _edit_config(tmp_path, r=0)
    model = copy.deepcopy(llama)
    with pytest.raises(ValueError, match=r"adapter_config.json: r: Bone: b=0 must be an int >= 1$"):
        interop.load_peft(model, tmp_path)
    assert not interop._adapters(model)


TENSOR_FAULTS = {  # a fault in a PEFT-made folder's tensors: (kind, key suffix, the edit)
    "weight_above_1": ("vblora_topk", "_topk_weights", lambda t: t + 1.5),
    "repeated_index": ("vblora_topk", "_topk_indices", lambda t: t[..., [0, 0, 2]]),
    "miss_nan": ("miss", "miss_block", lambda t: torch.full_like(t, float("nan"))),
}


@pytest.mark.parametrize("fault", list(TENSOR_FAULTS))
def test_load_peft_bad_tensors_checked_before_the_model_changes_and_a_retry_works(llama, tmp_path, fault):
    kind, suffix, edit = TENSOR_FAULTS[fault]
    ref = _peft_made(llama, kind, tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    sd = load_file(tmp_path / "bad" / "adapter_model.safetensors")
    key = next(k for k in sd if k.endswith(suffix))
    sd[key] = edit(sd[key])
    save_file(sd, tmp_path / "bad" / "adapter_model.safetensors")
    model = copy.deepcopy(llama)
    snap = _snapshot(model)
    module = re.split(r"\.(vblora|miss)", key[len("base_model.model."):])[0]  # the loader names our key there
    with pytest.raises(ValueError, match=re.escape(module) + r"\.(vblora_(w|idx)_[AB]|bone_B'?) holds (\w+ outside|non-f)"):
        interop.load_peft(model, tmp_path / "bad")
    assert _unchanged(model, snap)
    interop.load_peft(model, tmp_path / "good")  # the same model takes a good folder after a refusal
    torch.testing.assert_close(_logits(model), _logits(ref), atol=ATOL, rtol=0)


def test_load_peft_new_layers_take_the_models_eval_mode(llama, tmp_path):
    model = peft.get_peft_model(copy.deepcopy(llama), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                                      target_modules=["q_proj", "v_proj"]))
    _fill(model, keys=("lora_",), seed=3)
    model.save_pretrained(str(tmp_path))
    ours = copy.deepcopy(llama).eval()
    interop.load_peft(ours, tmp_path)
    assert not any(m.training for m in ours.modules())
    with torch.no_grad():  # no .eval() here: the load left the model as it was
        first, second = ours(input_ids=IDS).logits, ours(input_ids=IDS).logits
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    torch.testing.assert_close(first, _logits(model), atol=ATOL, rtol=0)
    trained = copy.deepcopy(llama).train()
    trained.model.layers[0].eval()  # each new layer takes its wrapped layer's mode, not the model's
    interop.load_peft(trained, tmp_path)
    assert [m.training for _, m in interop._adapters(trained)] == [False, False, True, True]


def test_peft_reexport_of_an_imported_fused_lora_keeps_its_rank(tmp_path):
    hf, fresh = _gpt2_pair()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    ref = peft.get_peft_model(copy.deepcopy(hf), cfg)
    _fill(ref, keys=("lora_",), seed=3)
    ref.save_pretrained(str(tmp_path / "in"))
    ours = fresh()
    interop.load_peft(ours, tmp_path / "in", layout=model_gpt2.gpt2_layout)
    interop.save_peft(ours, tmp_path / "out", layout=model_gpt2.gpt2_layout)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 4
    torch.testing.assert_close(_gpt_logits(_peft(hf, tmp_path / "out")), _gpt_logits(ref), atol=ATOL, rtol=0)


# ---- the scripts speak it: --export for Hugging Face's GPT2LMHeadModel and ViTForImageClassification, a PEFT
# folder as --init_from / --adapter, the adapter.safetensors they write


def _hf_gpt2(folder):
    """A tiny random GPT2LMHeadModel (vocab 257: the byte-level test encoding), saved where --init_from reads it."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=257, n_positions=128, n_embd=32, n_layer=1, n_head=2, bos_token_id=256,
                                  eos_token_id=256)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(str(folder))
    return hf


_GPT2_X = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))


def _last_logits(model):
    """The last position's logits (B, V): our GPT returns only those without targets; HF returns every position."""
    with torch.no_grad():
        if isinstance(model, model_gpt2.GPT):
            return model.eval()(_GPT2_X)[0][:, -1]
        return model.eval()(input_ids=_GPT2_X).logits[:, -1]


@pytest.mark.parametrize("method, kind", [("lora", "peft"), ("lora", "lora"), ("sera", "lora"), ("siva", "lora"),
                                          ("bone", "lora"), ("vblora", "lora")])
def test_gpt2_export_loads_in_gpt2lmheadmodel_with_our_logits(tmp_path, method, kind):
    _gpt2_write_e2e(tmp_path)
    hf = _hf_gpt2(tmp_path / "hf")
    exp = tmp_path / "exp"
    # --bone_b 32: one block of the 32-wide q and v, so ΔW's rank fits the LoRA (rank b) and the export is exact
    res = _gpt2_main(_gpt2_argv(tmp_path, tmp_path / "out", method, "--init_from", tmp_path / "hf", "--max_iters", "3",
                                "--eval_samples", "0", "--bone_b", "32", "--export", kind, exp))
    ours = _last_logits(res["model"])
    assert (ours - _last_logits(hf)).abs().max() > 1e-4  # training moved it: a silently ignored adapter would fail
    cfg = json.loads((exp / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] and cfg["base_model_name_or_path"] == str(tmp_path / "hf")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(exp))
    assert_close(_last_logits(theirs), ours)


def test_gpt2_export_peft_refused_before_training_where_peft_cannot_hold_it(tmp_path):
    _gpt2_write_e2e(tmp_path)
    for method, why in (("vblora", "zero sub-vectors"), ("bone", "MiSS takes only nn.Linear"),
                        ("sera", "PEFT has no such method")):
        msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", method, "--export", "peft", tmp_path / "exp"))
        assert msg.startswith("error: --export peft: ") and why in msg and f"use --export lora {tmp_path / 'exp'}" in msg
        assert not (tmp_path / "out").exists() and not (tmp_path / "exp").exists()  # nothing trained or written
    assert "the kind is peft" in _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora", "--export", "onnx", "x"))
    assert "trains no adapter" in _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "full", "--export", "lora", "x"))


def test_gpt2_peft_folder_as_adapter_and_as_init_from(tmp_path, monkeypatch):
    _gpt2_write_e2e(tmp_path)
    _hf_gpt2(tmp_path / "hf")
    exp = tmp_path / "exp"
    res = _gpt2_main(_gpt2_argv(tmp_path, tmp_path / "out", "lora", "--init_from", tmp_path / "hf", "--max_iters", "3",
                                "--eval_samples", "0", "--export", "peft", exp))
    trained = _last_logits(res["model"])
    assert_close(_last_logits(train_gpt2.load_finetuned(str(exp))), trained)  # its base: base_model_name_or_path
    monkeypatch.setattr(train_gpt2, "get_tokenizer", lambda bpe_dir=None, online=None: _gpt2_enc())
    mr = "name[Blue Spice] | food[French]"
    got = train_gpt2.main(["--sample", mr, "--adapter", str(exp), "--beam", "2", "--max_new_tokens", "8"])
    assert got["sample"] == _gpt2_decode(res["model"].eval(), _gpt2_enc(), ["name : Blue Spice | food : French"])[0]
    # --init_from a PEFT folder: its base, then its adapter, trained on (0 steps: exactly the folder's model)
    again = _gpt2_main(_gpt2_argv(tmp_path, tmp_path / "again", "lora", "--init_from", exp, "--max_iters", "0",
                                  "--eval_samples", "0"))
    assert_close(_last_logits(again["model"]), trained)
    msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "bad", "vblora", "--init_from", exp))
    assert msg == f"error: --init_from {exp} holds a PEFT LORA adapter: pass --method lora"


def test_gpt2_run_folder_loads_as_its_adapter(_gpt2_lora_run):
    new = train_gpt2.load_finetuned(str(_gpt2_lora_run.out / "adapter.safetensors"))
    assert_close(_last_logits(train_gpt2.load_finetuned(str(_gpt2_lora_run.out))), _last_logits(new))


@pytest.mark.parametrize("kind, expected", [("empty", "is an empty file, not an adapter.safetensors"),
                                            ("truncated", "is not a readable adapter.safetensors"),
                                            ("no_header", "is not a nanopeft adapter.safetensors: no args")])
def test_gpt2_bad_adapter_safetensors_is_one_line(_gpt2_lora_run, tmp_path, kind, expected):
    path = tmp_path / "adapter.safetensors"
    good = (_gpt2_lora_run.out / "adapter.safetensors").read_bytes()
    if kind == "no_header":
        save_file({"x": torch.zeros(2)}, str(path))
    else:
        path.write_bytes(b"" if kind == "empty" else good[:len(good) // 2])
    for load in (train_gpt2.load_finetuned, train_vit.load_finetuned):
        with pytest.raises(SystemExit) as e:
            load(str(path))
        assert str(e.value.code).startswith(f"error: {path} {expected}") and "\n" not in str(e.value.code)


def _rewrite_header(src, dst, edit):
    """A copy of a run's adapter.safetensors whose header `edit(meta)` changed."""
    blob = _read_adapter(src)
    from safetensors import safe_open
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = {k: v for k, v in blob.items() if k not in ("adapter", "head")}
    edit(meta)
    save_file(tensors, str(dst), metadata={"nanopeft": json.dumps(meta)})


HEADER_FAULTS = {  # an edit of a LoRA run's header -> what the one line must name
    "method_foo": (lambda m: m["args"].update(method="foo"), "args.method='foo': expected one of"),
    "method_none": (lambda m: m["args"].update(method="none"), "--method none trains no"),
    "args_list": (lambda m: m.update(args=[1, 2]), "args=[1, 2]: expected an object"),
    "lora_r": (lambda m: m["args"].update(lora_r=8), "the tensors do not fit the model its header describes"),
    "method_full": (lambda m: m["args"].update(method="full"), "tensors the model has not"),
    "n_head": (lambda m: (m["config"].update(n_head=3), m["args"].update(n_head=3)),
               "config.n_head=3: expected a divisor of config.n_embd=32"),
    "block_size_float": (lambda m: m["config"].update(block_size=1e12), "config.block_size=1000000000000.0: expected"),
    "block_size_int": (lambda m: (m["config"].update(block_size=10 ** 12), m["args"].update(block_size=10 ** 12)),
                       "parameters; expected at most"),
    "n_layer": (lambda m: (m["config"].update(n_layer=10 ** 6), m["args"].update(n_layer=10 ** 6)),  # 12 * 32² * 10⁶
                "makes a model of 1.23e+10 parameters; expected at most"),
}


@pytest.mark.parametrize("case", list(HEADER_FAULTS))
def test_gpt2_edited_header_is_one_line(_gpt2_lora_run, tmp_path, case):
    path = tmp_path / "adapter.safetensors"
    edit, why = HEADER_FAULTS[case]
    _rewrite_header(_gpt2_lora_run.out / "adapter.safetensors", path, edit)
    with pytest.raises(SystemExit) as e:
        train_gpt2.load_finetuned(str(path))
    msg = str(e.value.code)
    assert msg.startswith(f"error: {path}") and why in msg and "\n" not in msg, msg
    assert _gpt2_error(["--sample", "name[X]", "--adapter", path]) == msg  # the script says the same


@pytest.mark.parametrize("kind, why", [("pickle", "holds pickled objects other than tensors"),
                                       ("truncated", "not a readable checkpoint"),
                                       ("lora_run", "the adapter of a --method lora run holds no backbone")])
def test_gpt2_bad_base_checkpoint_is_one_line(_gpt2_lora_run, tmp_path, kind, why):
    _gpt2_write_e2e(tmp_path)
    if kind == "pickle":
        path = tmp_path / "pytorch_model.bin"
        torch.save({"w": torch.zeros(2), "obj": argparse.Namespace(x=1)}, path)
    elif kind == "truncated":
        _hf_gpt2(tmp_path / "hf")
        path = tmp_path / "hf" / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    else:
        path = _gpt2_lora_run.out / "adapter.safetensors"
    with pytest.raises(SystemExit) as e:
        model_gpt2.load_gpt2(str(path))
    assert str(e.value.code).startswith(f"error: --init_from {path}: {why}") and "\n" not in str(e.value.code)
    assert "weights_only=False" not in str(e.value.code)
    msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora", "--init_from", path))
    assert msg == e.value.code and not (tmp_path / "out").exists()


def _gpt2_peft_folder(tmp_path, **lora):
    """A tiny HF GPT-2 saved at tmp_path/hf, and a PEFT LoRA on it at tmp_path/peft naming that base."""
    hf = _hf_gpt2(tmp_path / "hf")
    ref = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                                 fan_in_fan_out=True, **lora))
    _fill(ref, keys=("lora_", "modules_to_save"), std=0.1, seed=3)
    ref.save_pretrained(str(tmp_path / "peft"))
    _edit_config(tmp_path / "peft", base_model_name_or_path=str(tmp_path / "hf"))
    return ref.eval()


@pytest.mark.parametrize("case", ["config_not_json", "r_zero", "alpha_string", "unknown_field", "weights_truncated",
                                  "no_config", "untargeted_module"])
def test_gpt2_faulty_peft_folder_is_one_line_through_the_scripts(tmp_path, monkeypatch, case):
    if case == "untargeted_module":  # a tensor fault, found with the model; the others before the data is read,
        _gpt2_write_e2e(tmp_path)  # so their runs have none
    _gpt2_peft_folder(tmp_path)
    change, file, why = FOLDER_FAULTS[case]
    if case == "untargeted_module":
        _edit_config(tmp_path / "peft", target_modules=["c_attn", "c_fc"])
        file, why = "adapter_model.safetensors", "holds no tensors for ['transformer.h.0.mlp.c_fc']"
    else:
        change(tmp_path / "peft")
    msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora", "--init_from", tmp_path / "peft"))
    assert msg.startswith(f"error: --init_from {tmp_path / 'peft'}") and file in msg and why in msg, msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        train_gpt2.load_finetuned(str(tmp_path / "peft"))
    assert file in str(e.value.code) and why in str(e.value.code) and "\n" not in str(e.value.code)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_gpt2_export_never_replaces_without_overwrite_nor_its_own_source(tmp_path):
    _gpt2_write_e2e(tmp_path)
    _gpt2_peft_folder(tmp_path)
    half = tmp_path / "half"  # a folder holding only the tensors of an adapter
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"keep")
    msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora", "--export", "peft", half))
    assert "holds an adapter (adapter_model.safetensors); pass --overwrite" in msg
    afile = tmp_path / "a-file"
    afile.write_bytes(b"keep")
    msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora", "--export", "lora", afile))
    assert msg == f"error: --export lora {afile}: that path is a file; expected a folder (new or holding an adapter " \
                  "to replace with --overwrite)"
    source = _files(tmp_path / "peft")
    for init, target in (("peft", "peft"), ("peft", "hf"), ("hf/model.safetensors", "hf")):  # its source, base
        msg = _gpt2_error(_gpt2_argv(tmp_path, tmp_path / "out", "lora", "--init_from", tmp_path / init,
                                     "--export", "peft", tmp_path / target, "--overwrite"))
        assert "is where this run's --init_from" in msg
    assert not (tmp_path / "out").exists() and (half / "adapter_model.safetensors").read_bytes() == b"keep"
    assert afile.read_bytes() == b"keep" and _files(tmp_path / "peft") == source


def test_gpt2_init_from_peft_refuses_method_flags_that_disagree(tmp_path):
    _gpt2_write_e2e(tmp_path)
    _gpt2_peft_folder(tmp_path)
    argv = _gpt2_argv(tmp_path, tmp_path / "out", "lora", "--init_from", tmp_path / "peft")
    msg = _gpt2_error(argv + ["--lora_r", "8"])
    assert msg == (f"error: --lora_r 8: --init_from {tmp_path / 'peft'} is a PEFT folder, whose adapter_config.json "
                   "sets r=4; drop --lora_r")
    assert "sets the targets; drop --targets" in _gpt2_error(argv + ["--targets", "q_proj"])
    assert not (tmp_path / "out").exists()


def test_gpt2_run_from_a_peft_folder_with_a_tied_head_loads_without_that_folder(tmp_path):
    _gpt2_write_e2e(tmp_path)
    ref = _gpt2_peft_folder(tmp_path, modules_to_save=["lm_head"])
    start = _gpt2_main(_gpt2_argv(tmp_path, tmp_path / "start", "lora", "--init_from", tmp_path / "peft",
                                  "--max_iters", "0", "--eval_samples", "0"))
    assert_close(_last_logits(start["model"]), _last_logits(ref))  # PEFT's logits, its own copy of the head
    res = _gpt2_main(_gpt2_argv(tmp_path, tmp_path / "out", "lora", "--init_from", tmp_path / "peft",
                                "--max_iters", "2", "--eval_samples", "0"))
    shutil.rmtree(tmp_path / "peft")
    back = train_gpt2.load_finetuned(str(tmp_path / "out" / "adapter.safetensors"))
    assert_close(_last_logits(back), _last_logits(res["model"]))


def _hf_vit(folder):
    """A tiny random ViTForImageClassification (4 labels) in the layout of Google's checkpoints."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256,
                                 image_size=16, patch_size=4, num_labels=4)
    hf = transformers.ViTForImageClassification(cfg).eval()
    hf.save_pretrained(str(folder))
    return hf


_VIT_X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))


def _vit_logits(model):
    with torch.no_grad():
        return model.eval()(_VIT_X) if isinstance(model, model_vit.ViT) else model.eval()(pixel_values=_VIT_X).logits


@pytest.mark.parametrize("method, kind", [("lora", "peft"), ("vblora", "peft"), ("bone", "peft"), ("sera", "lora"),
                                          ("siva", "lora"), ("bone", "lora")])
def test_vit_export_loads_in_vitforimageclassification_with_our_logits(tmp_path, method, kind):
    hf = _hf_vit(tmp_path / "hf")
    exp = tmp_path / "exp"
    res = train_vit.main(_vit_smoke_argv(tmp_path, method, "--init_from", str(tmp_path / "hf"), "--export", kind,
                                         str(exp)))
    ours = _vit_logits(res["model"])
    assert (ours - _vit_logits(hf)).abs().max() > 1e-4  # trained: head and adapter moved
    cfg = json.loads((exp / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"]
    assert_close(_vit_logits(peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(exp))), ours)
    if kind == "peft":  # and back: a PEFT folder as --init_from (0 steps: exactly that model)
        again = train_vit.main(_vit_smoke_argv(tmp_path, method, "--init_from", str(exp), "--max_iters", "0",
                                               "--out_dir", str(tmp_path / "again")))
        assert_close(_vit_logits(again["model"]), ours)


def test_vit_export_peft_of_siva_is_refused_before_training(tmp_path):
    msg = _vit_exit(_vit_smoke_argv(tmp_path, "siva", "--export", "peft", str(tmp_path / "exp")))
    assert msg.startswith("error: --export peft: ") and "PEFT has no such method" in msg and "--export lora" in msg
    assert not (tmp_path / "out").exists()


# ================================================================================================
# Beside the ecosystem: a user's clone (no workshop folder), no triton, transformers, another `kernels`
# ================================================================================================
ROOT = os.path.dirname(os.path.abspath(__file__))
METHOD_FILES = ("lora.py", "sera.py", "siva.py", "bone.py", "vblora.py")
NO_TRITON = ("import sys\n"  # what a Mac sees: `import triton` raises ImportError
             "sys.modules['triton'] = None\nsys.modules['triton.language'] = None\n")


def _python(code, cwd, env=None):
    """Run `code` as `python -` from cwd, as a user does from a folder: cwd comes first on sys.path."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANOPEFT_NO_TRITON")},
           **(env or {})}
    r = subprocess.run([sys.executable, "-"], input=code, cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_no_product_file_names_the_workshop_folder():
    product = [f for f in os.listdir(ROOT) if f.endswith((".py", ".md", ".txt")) and f != "test_all.py"]
    assert "README.md" in product and "train_gpt2.py" in product
    for f in product:
        with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
            text = fh.read()
        assert not re.search(r"\.\./shared|[\"']shared[\"']", text), f"{f} names ../shared, which a user's clone lacks"


def test_kernels_imports_without_triton_says_no_and_its_ops_raise():
    out = _python(NO_TRITON + textwrap.dedent("""
        import torch, kernels
        x, W, A, B = torch.randn(3, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
        print(kernels.HAS_TRITON, kernels.applies(x, W))
        try:
            kernels.lowrank_linear(x, W, None, A, B)
        except RuntimeError as e:
            print(e)
        """), ROOT, env={"TRITON_INTERPRET": "1"})  # the interpreter asked for, but no triton: still no
    lines = out.splitlines()
    assert lines[0] == "False False"
    assert lines[1].startswith("kernels.lowrank_linear: triton is not installed") and "lowrank_linear_reference" in lines[1]


def test_transformers_and_lora_work_from_the_repository_root_without_triton():
    _needs_hf()
    out = _python(NO_TRITON + textwrap.dedent("""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        import lora
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
        ids = torch.randint(0, 50, (2, 6))
        before = m(ids).logits
        names = lora.apply_lora(m, lora.LoRAConfig(r=2), ["q_proj", "v_proj"])
        after = m(ids).logits
        after.sum().backward()
        grads = sorted(n for n, p in m.named_parameters() if p.grad is not None)
        print(len(names), torch.equal(before, after), len(grads), all("lora_" in n for n in grads))
        """), ROOT)
    assert out.split() == ["4", "True", "8", "True"]  # 2 layers x q, v; B = 0: the same logits; A, B get gradients


def _hf_kernels_installed():
    import importlib.metadata
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers >= 5.25 requires it)")


def test_hugging_face_kernels_transformers_and_peft_work_beside_ours_from_the_repository_root():
    _needs_hf()
    _hf_kernels_installed()
    out = _python(textwrap.dedent("""
        import importlib.metadata, os
        import torch, peft
        from transformers import LlamaConfig, LlamaForCausalLM
        from kernels import CUDAProperties, Mode, get_kernel
        import kernels, lora, vblora
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
        pm = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        ids = torch.randint(0, 50, (2, 6))
        loss = pm(ids, labels=ids).loss
        loss.backward()
        print(os.path.samefile(kernels.__file__, "kernels.py"), lora._kernels is kernels, vblora._kernels is kernels,
              callable(get_kernel), kernels.__version__ == importlib.metadata.version("kernels"),
              bool(torch.isfinite(loss)), sum(p.grad is not None for p in pm.parameters()))
        """), ROOT)
    assert out.split() == ["True"] * 6 + ["8"], out  # ours for the method files, theirs for transformers


def test_kernels_answers_for_a_hugging_face_package_without_replacing_a_name_of_ours(tmp_path):
    site = tmp_path / "site"  # a stand-in distribution named `kernels`, found before any real one
    (site / "kernels" / "_internals").mkdir(parents=True)
    (site / "kernels" / "_internals" / "__init__.py").write_text("")
    (site / "kernels" / "_internals" / "load.py").write_text("def get_kernel(name):\n    return 'hub:' + name\n")
    (site / "kernels" / "__init__.py").write_text(  # their __init__ reads its own __path__, as a package may
        "from kernels._internals.load import get_kernel\napplies = 'theirs'\n__version__ = __path__[0][-7:] + '9.9'\n")
    (site / "kernels-9.9.dist-info").mkdir()
    (site / "kernels-9.9.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 9.9\n")
    out = _python(textwrap.dedent("""
        import kernels
        from kernels import get_kernel
        import lora
        print(get_kernel("x"), kernels.__version__, kernels.applies.__module__, lora._kernels is kernels)
        try:
            kernels.no_such_name
        except AttributeError as e:
            print("AttributeError")
        """), ROOT, env={"PYTHONPATH": str(site)})
    assert out.split() == ["hub:x", "kernels9.9", "kernels", "True", "AttributeError"], out
    # without their distribution this file is a plain module: no package path, no fallback lookup
    out = _python(textwrap.dedent("""
        import importlib.metadata as md
        def _absent(name):
            raise md.PackageNotFoundError(name)
        md.distribution = _absent
        import kernels
        print(hasattr(kernels, "__path__"), "__getattr__" in vars(kernels))
        """), ROOT)
    assert out.split() == ["False", "False"], out


@pytest.mark.parametrize("method_file", METHOD_FILES)
def test_a_method_file_copied_beside_another_kernels_module_runs_its_own_formula(tmp_path, method_file):
    shutil.copy(os.path.join(ROOT, method_file), tmp_path)
    (tmp_path / "kernels.py").write_text("def applies(*tensors):\n    return True\n")  # someone else's kernels
    name = method_file[:-3]
    setup = {"lora": "lora.apply_lora(m, lora.LoRAConfig(r=4, dropout=0.0), ['0'])",
             "sera": "sera.apply_sera(m, sera.SeRAConfig(r=4), ['0'])",
             "siva": "siva.apply_siva(m, siva.SiVAConfig(), ['0'])",
             "bone": "bone.apply_bone(m, bone.BoneConfig(b=8), ['0'])",
             "vblora": "vblora.apply_vblora(m, vblora.VBLoRAConfig(r=2, b=8, h=4), ['0'])"}[name]
    out = _python(textwrap.dedent(f"""
        import torch, {name}
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(16, 16))
        {setup}
        layer = m[0]
        for p in layer.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)  # a non-zero update
        x = torch.randn(3, 16, requires_grad=True)
        y = m(x)
        y.square().sum().backward()
        W = layer.base.weight if hasattr(layer, "base") else layer.weight
        ref = x @ (W + layer.delta_weight()).T + layer.base.bias
        print({name}._kernels is None, torch.allclose(y, ref, atol=1e-5), x.grad is not None)
        """), tmp_path)
    assert out.split() == ["True", "True", "True"], out


# ================================================================================================
# reproduce.py
# ================================================================================================
# Its data preparation, cache of finished runs, sweep and slot accuracy. Its --quick mode runs end to end in .ci/run.


def test_reproduce_cache_reuses_a_finished_run_and_redoes_a_changed_one(tmp_path):
    calls = []

    def main(argv):
        calls.append(argv)
        return {"model": "a model", "predictions": ["x"], "score": len(calls)}
    main.__module__ = "stub"
    out = str(tmp_path / "row")
    first = reproduce.cached_run(main, ["--a", "1"], out, deps=["base1"], analyse=lambda m: f"saw {m}")
    assert calls == [["--a", "1", "--out_dir", out, "--overwrite"]]
    assert first["score"] == 1 and first["analysis"] == "saw a model" and "model" not in first
    assert first["predictions"] == ["x"]  # kept: slot accuracy reads them
    assert reproduce.cached_run(main, ["--a", "1"], out, deps=["base1"]) == first and len(calls) == 1  # reused
    assert reproduce.cached_run(main, ["--a", "2"], out, deps=["base1"])["score"] == 2  # a changed flag
    assert reproduce.cached_run(main, ["--a", "2"], out, deps=["base2"])["score"] == 3  # a rebuilt base
    assert reproduce.cached_run(main, ["--a", "2"], out, deps=["base2"])["score"] == 3 and len(calls) == 3
    os.remove(os.path.join(out, "result.json"))  # a run that never finished has no result.json
    assert reproduce.cached_run(main, ["--a", "2"], out, deps=["base2"])["score"] == 4


def test_reproduce_refuses_a_run_that_stopped_before_its_max_iters(tmp_path):
    # the scripts also stop at --epochs: a base that ran 350 of its 1,200 steps must not be cached as done
    main = lambda argv: {"model": None, "step": 350}
    main.__module__ = "stub"
    out = str(tmp_path / "base")
    with pytest.raises(RuntimeError, match=r"stopped at step 350, not --max_iters 1200; raise its --epochs"):
        reproduce.cached_run(main, ["--method", "full", "--max_iters", "1200"], out)
    assert not os.path.exists(os.path.join(out, "result.json"))
    assert reproduce.cached_run(main, ["--method", "full", "--max_iters", "350"], out)["step"] == 350
    zero_shot = lambda argv: {"model": None, "step": 0}  # method none: no step is its whole run
    zero_shot.__module__ = "stub"
    assert reproduce.cached_run(zero_shot, ["--method", "none", "--max_iters", "300"], str(tmp_path / "zs"))["step"] == 0


def test_reproduce_offline_without_data_names_everything_and_the_data_flag(monkeypatch, tmp_path):
    probes = []
    monkeypatch.setattr(common, "network_ok", lambda *a, **k: probes.append(1) or False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
        load_dataset=lambda *a, **k: pytest.fail("a download was tried although the probe said offline")))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda *a: pytest.fail("tiktoken asked to download"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))  # this machine's cache may hold the BPE
    args = reproduce.p.parse_args(["--out_dir", str(tmp_path / "out")])
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        reproduce.prepare_data(args, ["gpt2", "vit"])
    msg = str(e.value.code)
    assert time.time() - t0 < 5 and probes == [1]
    lines = msg.splitlines()
    assert lines[0] == "error: no network (could not reach huggingface.co); these could not be fetched:" and len(lines) == 5
    for line, what in zip(lines[1:4], ("tuetschek/e2e_nlg", "vocab.bpe", "uoft-cs/cifar10")):
        assert what in line and "pass" not in line, line  # the scripts' own flags do not apply here
    assert lines[4].startswith("pass --data DIR instead, a folder holding e2e/") and "shared" not in msg


def test_reproduce_data_folder_missing_files_are_named_before_any_work(tmp_path):
    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "trainset.csv").write_text("mr,ref\n")
    args = reproduce.p.parse_args(["--data", str(tmp_path), "--out_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        reproduce.prepare_data(args, ["gpt2", "vit"])
    msg = str(e.value.code)
    assert msg.startswith(f"error: --data {tmp_path}: missing ") and "\n" not in msg
    for f in ("devset.csv", "testset_w_refs.csv", "vocab.bpe", "encoder.json", "cifar10_subset_6k_decoded.npz"):
        assert f in msg
    assert "trainset.csv," not in msg.split("; --data takes")[0]  # present, so not listed
    assert not (tmp_path / "out").exists()


def test_reproduce_prepares_a_seeded_test_sample_across_the_file_and_a_held_out_vit_split(tmp_path):
    d = tmp_path / "data"
    (d / "e2e").mkdir(parents=True)
    (d / "gpt2").mkdir()
    for f in ("vocab.bpe", "encoder.json"):
        (d / "gpt2" / f).write_text("x")
    rows = [(f"name[R{i // 3}], near[N{i // 3}]", f"R{i // 3} is near N{i // 3}, ref {i % 3}.") for i in range(300)]
    for f in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        with open(d / "e2e" / f, "w", newline="") as fh:
            csv.writer(fh).writerows([("mr", "ref")] + rows)
    lora = [(f"name : R{i // 3} | near : N{i // 3}", f"R{i // 3} is near N{i // 3} , ref {i % 3} .") for i in range(300)]
    g = np.random.default_rng(0)
    y_train, y_test = np.repeat(np.arange(10), 500), np.tile(np.arange(10), 100)  # classes in blocks, interleaved
    x_train = g.integers(0, 256, (5000, 4, 4, 3), dtype=np.uint8)
    x_train[:, 0, 0, 0], x_train[:, 0, 0, 1] = np.arange(5000) // 256, np.arange(5000) % 256  # an id per image
    np.savez(d / "cifar.npz", x_train=x_train, y_train=y_train, x_test=g.integers(0, 256, (1000, 4, 4, 3), dtype=np.uint8),
             y_test=y_test, class_names=np.array([f"c{i}" for i in range(10)]))
    args = reproduce.p.parse_args(["--data", str(d), "--cifar", str(d / "cifar.npz"), "--out_dir", str(tmp_path / "o")])
    paths = reproduce.prepare_data(args, ["gpt2", "vit"])
    test = e2e.read_lora_txt(os.path.join(paths["e2e"], "test.txt"))  # LoRA's form, as train_gpt2 reads it
    mrs = list(dict.fromkeys(mr for mr, _ in test))
    assert len(mrs) == reproduce.N_TEST and len(test) == 3 * reproduce.N_TEST  # every reference of each MR kept
    idx = sorted(int(re.match(r"name : R(\d+) ", mr)[1]) for mr in mrs)
    assert idx == [int(re.match(r"name : R(\d+) ", mr)[1]) for mr in mrs]  # file order
    assert idx[0] < 20 and idx[-1] > 80  # drawn across the file, not its head
    assert mrs == list(dict.fromkeys(mr for mr, _ in reproduce.sample_test_mrs(lora, reproduce.N_TEST)))  # seeded
    assert e2e.read_lora_txt(os.path.join(paths["e2e"], "train.txt")) == lora
    lines = open(paths["refs"]).read().splitlines()  # the references alone, no MR, grouped by MR
    assert all(line.endswith("<|endoftext|>") for line in lines)  # each one a document: EOS after it
    lines = [line[:-len("<|endoftext|>")] for line in lines]
    assert sorted(lines) == sorted(ref for _, ref in lora) and not any(" : " in line for line in lines)
    groups = [int(re.match(r"R(\d+) ", line)[1]) for line in lines]
    assert all(groups[i] == groups[i + 1] == groups[i + 2] for i in range(0, 300, 3))  # one MR's three together
    assert groups[::3] != sorted(groups[::3])  # the groups in a shuffled order, not the file's
    assert reproduce.references_by_mr(lora) == open(paths["refs"]).read()  # seeded: the same text every time
    vit, val = np.load(paths["vit"]), np.load(paths["vit_val"])
    assert np.array_equal(vit["x_train"], val["x_train"]) and np.bincount(vit["y_train"]).tolist() == [450] * 10
    assert np.bincount(val["y_test"]).tolist() == [50] * 10 and np.bincount(vit["y_test"]).tolist() == [100] * 10
    ids = lambda x: set((256 * x[:, 0, 0, 0].astype(int) + x[:, 0, 0, 1]).tolist())
    # the validation images are the last 50 of each class's 500, and never trained on
    assert ids(val["x_test"]) == {i for c in range(10) for i in range(500 * c + 450, 500 * c + 500)}
    assert ids(vit["x_train"]) == set(range(5000)) - ids(val["x_test"])
    src = np.load(d / "cifar.npz")  # every test image, grouped by class
    assert np.array_equal(vit["x_test"], src["x_test"][np.argsort(src["y_test"], kind="stable")])


def test_reproduce_sweep_grows_by_x5_until_the_best_is_bracketed():
    assert [reproduce.scale_lr(x, f) for x, f in (("1e-3", 5), ("2e-4", 5), ("5e-2", 0.2), ("1", 2.5))] == \
        ["5e-3", "1e-3", "1e-2", "2.5e0"]
    assert reproduce.scale_lr(("5e-3", "5e-2"), 5) == ("2.5e-2", "2.5e-1")  # VB-LoRA's pair moves together
    calls = []

    def score(lr):  # a valley at 2.5e-2, by hand: |log(lr / 2.5e-2)|
        calls.append(lr)
        return abs(math.log(float(lr) / 2.5e-2))
    grid, ok = reproduce.bracket(["2e-4", "1e-3"], score)
    assert ok and [lr for lr, _ in grid] == ["2e-4", "1e-3", "5e-3", "2.5e-2", "1.25e-1"] and calls == [lr for lr, _ in grid]
    grid, ok = reproduce.bracket(["1", "5"], score)  # downwards: 1 is the best end, then 0.2, 0.04, 0.008
    assert ok and [lr for lr, _ in grid] == ["8e-3", "4e-2", "2e-1", "1", "5"]
    grid, ok = reproduce.bracket(["1", "5"], lambda lr: -float(lr))  # better without end: stops at the limit, flagged
    assert not ok and grid[-1][0] == "5" and len(grid) == 2
    valley = {"1e-3": 2.0, "5e-3": 1.0, "2.5e-2": 1.0, "1.25e-1": 3.0}  # the best ties the upper end: one more step
    grid, ok = reproduce.bracket(["1e-3", "5e-3", "2.5e-2"], valley.__getitem__)
    assert ok and [lr for lr, _ in grid] == ["1e-3", "5e-3", "2.5e-2", "1.25e-1"]


def test_reproduce_slot_accuracy_counts_verbatim_values_case_aside():
    mrs = ["name : The Eagle | Type : pub | near : Burger King", "name : Blue Spice | food : French",
           "name : Alimentum | near : Yippee Noodle Bar", "name : Zizzi"]
    outs = ["the eagle is a pub near Burger King.", "Fitzbillies serves French food.",
            "Alimentum is near the Yippee Noodle Bar.", "Zizz is a pub."]
    assert reproduce.mr_slots(mrs[0]) == {"name": "The Eagle", "Type": "pub", "near": "Burger King"}
    acc = reproduce.slot_accuracy(mrs, outs)
    assert acc["name"] == 2 / 4 and acc["near"] == 2 / 2 and acc["all"] == 2 / 4
    assert reproduce.gap_closed(3.0, 4.0, 2.0) == 0.5 and reproduce.gap_closed(4.0, 4.0, 2.0) == 0.0
    assert reproduce.mean_curve([[(1, 2.0), (2, 4.0)], [(1, 4.0), (2, 6.0), (3, 1.0)]]) == [(1, 3.0), (2, 5.0)]
