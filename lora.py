"""LoRA: Low-Rank Adaptation (Hu et al., ICLR 2022), the baseline every nanopeft paper compares against.

    y = x W0^T + b + (alpha / r) * dropout(x) A^T B^T,   ΔW = (alpha / r) B A
    A: (r, in) kaiming_uniform_(a=sqrt(5)) as in loralib,   B: (out, r) zeros, so ΔW = 0 at init.

Trainable parameters per layer: r * (in + out). Defaults are the GPT-2 E2E recipe of the LoRA paper
(r=4, alpha=32, dropout 0.1, on q and v); its RoBERTa-large GLUE recipe is r=8, alpha=16.

Choices (loralib's unless said):
- dropout acts on x before A only; the base path sees the clean x.
- forward is the formula below in plain PyTorch; that is what runs on a CPU. On CUDA tensors (or
  under TRITON_INTERPRET=1) the same maths runs as kernels.lowrank_linear, one fused op that draws
  the dropout mask inside the kernels. NANOPEFT_NO_TRITON=1 keeps the plain formula everywhere.
- delta_weight() is float32 (float64 for float64 layers); merge() adds it to W at that precision and
  rounds once to W's dtype.
- No auto-merge on eval() (loralib merges on eval()): merge()/unmerge() are explicit and
  idempotent; while merged, forward = base(x). A weight tied to another module (GPT-2's lm_head
  and its embedding) is never merged: that would change the other module too.
- apply_lora freezes everything except adapter tensors, so adapters applied before (any nanopeft
  method, on other layers) stay trainable.
- No analysis helper here: the LoRA paper's subspace similarity φ is sera.subspace_similarity
  (SeRA's Eq. 4 is the same measure) and works on any delta_weight().
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # kernels.py beside this file, and only it: Hugging Face's `kernels` package has the same name
    import kernels as _kernels
    _kernels = _kernels if getattr(_kernels, "NANOPEFT_KERNELS", False) else None
except ImportError:
    _kernels = None

ADAPTER_PREFIXES = ("lora_", "sera_", "siva_", "bone_", "vblora_")  # every nanopeft method names its tensors so


@dataclass
class LoRAConfig:
    r: int = 4  # rank of ΔW; 4 in the LoRA paper's GPT-2 E2E runs
    alpha: float = 32.0  # scale = alpha / r, so changing r needs no lr retuning; 32 for GPT-2 E2E
    dropout: float = 0.1  # on x before A; 0.1 for GPT-2 E2E

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA: r={self.r!r} must be an int >= 1")
        if isinstance(self.alpha, bool) or not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
                                                and self.alpha > 0):
            raise ValueError(f"LoRA: alpha={self.alpha!r} must be a finite number > 0")
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"LoRA: dropout={self.dropout!r} must lie in [0, 1)")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.cfg = cfg
        self.r = cfg.r
        self.scale = cfg.alpha / cfg.r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False
        self.tied_to = []  # other parameters that are this weight (set by apply_lora); merge() refuses then
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(cfg.r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, cfg.r, **kw))  # ΔW = 0 at init
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # fan-in = in: bound 1 / sqrt(in)

    def forward(self, x):
        if self.merged:
            return self.base(x)
        if _kernels is not None and _kernels.applies(x, self.lora_A):  # the same maths, fused, on the GPU
            p = self.cfg.dropout if self.training else 0.0
            return _kernels.lowrank_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                           None, self.scale, dropout=p)
        h = F.linear(self.dropout(x), self.lora_A)  # (..., r) = dropout(x) A^T
        return self.base(x) + F.linear(self.scale * h, self.lora_B)  # (..., out): + scale x A^T B^T

    def delta_weight(self):
        ct = torch.promote_types(self.lora_A.dtype, torch.float32)  # fp32 at least, so merges round once
        return self.scale * (self.lora_B.to(ct) @ self.lora_A.to(ct))  # (out, r) @ (r, in) = (out, in)

    @torch.no_grad()
    def merge(self):
        if self.tied_to:
            raise ValueError(f"LoRA: cannot merge, this layer's weight is shared with {self.tied_to} (tied); "
                             "merging would change them too. Untie first, e.g. "
                             "layer.base.weight = nn.Parameter(layer.base.weight.detach().clone())")
        if not self.merged:
            self.base.weight.copy_(self.base.weight + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base.weight.copy_(self.base.weight - self.delta_weight())
            self.merged = False

    def extra_repr(self):
        return f"r={self.r}, scale={self.scale:g}"


def lora_param_count(d_in, d_out, cfg):
    """Trainable (and stored) parameters of one layer: r * (d_in + d_out)."""
    return cfg.r * (d_in + d_out)


def apply_lora(model, cfg, targets):
    """Wrap every targeted nn.Linear in LoRALinear and freeze all but adapter tensors; returns the names.

    A module named n is adapted iff it is an nn.Linear and n == t or n.endswith("." + t) for a t in targets.
    Adapters applied before (any method, other layers) keep their trainable tensors.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("LoRA: targets is empty; name at least one nn.Linear")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hit = lambda n, t: n == t or n.endswith("." + t)
    for t in targets:
        if not any(hit(n, t) for n in linears):
            raise ValueError(f"LoRA: target {t!r} matches no nn.Linear; some Linear names: {list(linears)[:6]}")
    names = [n for n in linears if any(hit(n, t) for t in targets)]
    for n in names:  # a parent that reads child.weight itself would bypass the adapter's forward
        parent = model.get_submodule(n.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"LoRA: cannot adapt {n!r}: nn.MultiheadAttention reads its out_proj.weight "
                             "directly, so the adapter would be bypassed")
    layers = {n: LoRALinear(linears[n], cfg) for n in names}  # every error before any change to the model
    for n, p in model.named_parameters():
        if not any(part.startswith(ADAPTER_PREFIXES) for part in n.split(".")):
            p.requires_grad_(False)
    shared = list(model.named_parameters(remove_duplicate=False))
    for n, layer in layers.items():
        parent_name, _, child = n.rpartition(".")
        layer.tied_to = [m for m, p in shared if p is linears[n].weight and m != n + ".weight"]
        setattr(model.get_submodule(parent_name), child, layer)
    return names


def lora_state_dict(model):
    """Only the adapter tensors (lora_A, lora_B of every LoRALinear)."""
    return {n: t for n, t in model.state_dict().items() if n.rpartition(".")[2].startswith("lora_")}


def load_lora_state_dict(model, sd):
    """Copy adapter tensors into a model that apply_lora adapted with the same config (strict).

    Everything is checked before anything is written."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"LoRA: adapter keys differ from the model's: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for n, t in sd.items():
        if t.shape != own[n].shape:
            raise ValueError(f"LoRA: {n!r} has shape {tuple(t.shape)}, the model's is {tuple(own[n].shape)} "
                             f"(different r?)")
        if not t.is_floating_point():
            raise ValueError(f"LoRA: {n!r} has dtype {t.dtype}, expected a floating-point tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"LoRA: {n!r} holds non-finite values (NaN or inf)")
    if any(m.merged for m in model.modules() if isinstance(m, LoRALinear)):
        raise ValueError("LoRA: a layer is merged; unmerge() before loading")
    with torch.no_grad():
        for n, t in sd.items():
            own[n].copy_(t)  # state_dict tensors share storage with the parameters
