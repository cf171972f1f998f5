"""SeRA: Vector Segmented and Recombined Adaptation (anonymous, ICLR 2025 submission).

The paper writes layers in row-vector form, h = x W0 + x ΔW (Eq. 1), with

    ΔW = A C B,   A = blockdiag(A_1 .. A_split),  A_i: (in/split, r/split)    (Eq. 2)
                  C: (r, r)
                  B = blockdiag(B_1 .. B_split),  B_i: (r/split, out/split)

so x is cut into `split` segments, each reduced on its own by A_i, the reduced segments are mixed
by the square C (the role W_o plays in multi-head attention), and the result is cut again and each
segment expanded by B_i. In torch's (out, in) layout the update is delta_weight() = scale * (A C B)^T.
Trainable parameters per layer (§3.2): (in + out) * r/split + r^2.

Choices where the paper is silent:
- scale = alpha / r, LoRA's convention (§3.1: "consistent with LoRA, we scale xΔW by α, a
  constant"). The paper's hyper-parameter appendix is missing from our copy; alpha = 16 is the
  (r=8, α=16) of the LoRA RoBERTa-large GLUE recipe that §4.4 says SeRA follows. Keep alpha fixed
  while sweeping r, as LoRA does.
- Init: A_i and C follow kaiming_uniform_(a=sqrt(5)) (the paper's "Kaiming", loralib's rule), A with
  the per-block fan-in in/split as in MELoRA; B = 0, so the adapted model starts exactly at W0.
- dropout (default 0, the paper names none) acts on x before A, as in LoRA.
- The forward never builds blockdiag(A), blockdiag(B) or ΔW: x is viewed as (N, split, in/split) and
  multiplied segment-wise, N * ((in + out) * r/split + r^2) multiply-adds. That plain formula is what
  runs on a CPU; on CUDA tensors (or under TRITON_INTERPRET=1) the same chain runs as one Triton op,
  kernels.sera_delta. NANOPEFT_NO_TRITON=1 keeps the plain formula everywhere. delta_weight() forms
  only the non-zero blocks of ΔW (for merging and analysis).
- delta_weight() is float32 (float64 for float64 layers); merge() adds it to W at that precision and
  rounds once to W's dtype.
- No auto-merge on eval(): merge()/unmerge() are explicit and idempotent; while merged, forward = base(x).
  A weight tied to another module is never merged (that would change the other module too).
- apply_sera freezes everything except adapter tensors, so adapters applied before stay trainable.
- subspace_similarity (Eq. 4) takes U = the left singular vectors of the paper's ΔW (in, out), i.e.
  of delta_weight().T: directions in the layer's input space ("column singular directions"), as the
  LoRA paper's φ does for its input-side A.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

try:  # kernels.py beside this file, and only it: Hugging Face's `kernels` package has the same name
    import kernels as _kernels
    _kernels = _kernels if getattr(_kernels, "NANOPEFT_KERNELS", False) else None
except ImportError:
    _kernels = None

ADAPTER_PREFIXES = ("lora_", "sera_", "siva_", "bone_", "vblora_")  # every nanopeft method names its tensors so


@dataclass
class SeRAConfig:
    r: int = 8  # width of the mixing space (C is r x r); the paper's CLIP and GLUE runs use 8
    split: Optional[int] = None  # segments of x and of the output; None = r, the paper's default (§4)
    alpha: float = 16.0  # scale = alpha / r (LoRA's convention); 16 as in LoRA's RoBERTa-large recipe
    dropout: float = 0.0  # on x before A; the paper uses none

    def __post_init__(self):
        if self.split is None:
            self.split = self.r
        for name in ("r", "split"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SeRA: {name}={v!r} must be an int >= 1")
        if self.r % self.split:
            raise ValueError(f"SeRA: split={self.split} must divide r={self.r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"SeRA: alpha={self.alpha!r} must be a finite number > 0")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"SeRA: dropout={self.dropout!r} must lie in [0, 1)")


class SeRALinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: SeRAConfig):
        super().__init__()
        d_in, d_out, s, r = base.in_features, base.out_features, cfg.split, cfg.r
        for what, d in (("in_features", d_in), ("out_features", d_out)):
            if d % s:
                raise ValueError(f"SeRA: split={s} must divide {what}={d} (layer {d_in}->{d_out})")
        self.base = base.requires_grad_(False)
        self.cfg = cfg
        self.split, self.r = s, r
        self.scale = cfg.alpha / r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.merged = False
        self.tied_to = []  # other parameters that are this weight (set by apply_sera); merge() refuses then
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.sera_A = nn.Parameter(torch.empty(s, d_in // s, r // s, **kw))  # A_i stacked
        self.sera_C = nn.Parameter(torch.empty(r, r, **kw))
        self.sera_B = nn.Parameter(torch.zeros(s, r // s, d_out // s, **kw))  # B_i stacked; ΔW = 0 at init
        # kaiming_uniform_(a=sqrt(5)): gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in)
        # = 1 / sqrt(fan_in).
        # Done by hand because torch would read the fan-in of the stacked 3-D A as (in/split) * (r/split);
        # each A_i sees in/split inputs, C sees r.
        bound_A, bound_C = 1 / math.sqrt(d_in // s), 1 / math.sqrt(r)
        nn.init.uniform_(self.sera_A, -bound_A, bound_A)
        nn.init.uniform_(self.sera_C, -bound_C, bound_C)

    def forward(self, x):
        if self.merged:
            return self.base(x)
        A, C, B = self.sera_A, self.sera_C, self.sera_B
        if _kernels is not None and _kernels.applies(x, A, C, B):  # the same chain, one Triton op
            return self.base(x) + _kernels.sera_delta(self.dropout(x), A, C, B, self.scale)
        xs = self.dropout(x).unflatten(-1, (self.split, -1))  # (..., split, in/split): x's segments x_s
        h = torch.einsum("...si,sia->...sa", xs, A)  # (..., split, r/split): h_s = x_s A_s
        z = (self.scale * h.flatten(-2)) @ C  # (..., r): the segments mixed by C
        zs = z.unflatten(-1, (self.split, -1))  # (..., split, r/split)
        dy = torch.einsum("...sa,sao->...so", zs, B)  # (..., split, out/split): z_s B_s
        return self.base(x) + dy.flatten(-2)  # (..., out)

    def delta_weight(self):
        ct = torch.promote_types(self.sera_A.dtype, torch.float32)  # fp32 at least, so merges round once
        s, a = self.split, self.r // self.split
        A, B = self.sera_A.to(ct), self.sera_B.to(ct)
        C = self.sera_C.to(ct).view(s, a, s, a)  # (split, r/split, split, r/split): C's blocks C_st
        # block (s, t) of A C B is A_s C_st B_t; the zero blocks of blockdiag(A), blockdiag(B) are never formed
        dwt = torch.einsum("sia,satb,tbo->sito", A, C, B)  # (split, in/split, split, out/split)
        return self.scale * dwt.reshape(self.base.in_features, self.base.out_features).T  # (out, in)

    @torch.no_grad()
    def merge(self):
        if self.tied_to:
            raise ValueError(f"SeRA: cannot merge, this layer's weight is shared with {self.tied_to} (tied); "
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
        return f"r={self.r}, split={self.split}, scale={self.scale:g}"


def sera_param_count(d_in, d_out, cfg):
    """Trainable (and stored) parameters of one layer (§3.2): (d_in + d_out) * r/split + r^2."""
    return (d_in + d_out) * (cfg.r // cfg.split) + cfg.r ** 2


def apply_sera(model, cfg, targets):
    """Wrap every targeted nn.Linear in SeRALinear and freeze all but adapter tensors; returns the names.

    A module named n is adapted iff it is an nn.Linear and n == t or n.endswith("." + t) for a t in targets.
    Adapters applied before (any method, other layers) keep their trainable tensors.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("SeRA: targets is empty; name at least one nn.Linear")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hit = lambda n, t: n == t or n.endswith("." + t)
    for t in targets:
        if not any(hit(n, t) for n in linears):
            raise ValueError(f"SeRA: target {t!r} matches no nn.Linear; some Linear names: {list(linears)[:6]}")
    names = [n for n in linears if any(hit(n, t) for t in targets)]
    for n in names:  # a parent that reads child.weight itself would bypass the adapter's forward
        parent = model.get_submodule(n.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"SeRA: cannot adapt {n!r}: nn.MultiheadAttention reads its out_proj.weight "
                             "directly, so the adapter would be bypassed")
    layers = {n: SeRALinear(linears[n], cfg) for n in names}  # every error before any change to the model
    for n, p in model.named_parameters():
        if not any(part.startswith(ADAPTER_PREFIXES) for part in n.split(".")):
            p.requires_grad_(False)
    shared = list(model.named_parameters(remove_duplicate=False))
    for n, layer in layers.items():
        parent_name, _, child = n.rpartition(".")
        layer.tied_to = [m for m, p in shared if p is linears[n].weight and m != n + ".weight"]
        setattr(model.get_submodule(parent_name), child, layer)
    return names


def sera_state_dict(model):
    """Only the adapter tensors (sera_A, sera_C, sera_B of every SeRALinear)."""
    return {n: t for n, t in model.state_dict().items() if n.rpartition(".")[2].startswith("sera_")}


def load_sera_state_dict(model, sd):
    """Copy adapter tensors into a model that apply_sera adapted with the same config (strict).

    Everything is checked before anything is written."""
    own = sera_state_dict(model)
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"SeRA: adapter keys differ from the model's: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for n, t in sd.items():
        if t.shape != own[n].shape:
            raise ValueError(f"SeRA: {n!r} has shape {tuple(t.shape)}, the model's is {tuple(own[n].shape)} "
                             f"(different r/split?)")
        if not torch.isfinite(t).all():
            raise ValueError(f"SeRA: {n!r} holds non-finite values (NaN or inf)")
    if any(m.merged for m in model.modules() if isinstance(m, SeRALinear)):
        raise ValueError("SeRA: a layer is merged; unmerge() before loading")
    with torch.no_grad():
        for n, t in sd.items():
            own[n].copy_(t)  # state_dict tensors share storage with the parameters


def subspace_similarity(dW1, dW2, i, j):
    """Eq. 4: φ(ΔW1, ΔW2, i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), in [0, 1].

    dW1, dW2 in the (out, in) layout of delta_weight(), same in_features. U are the left singular
    vectors of the paper's ΔW = dW.T (input-space directions), sorted by decreasing singular value.
    0: the top-i and top-j subspaces are orthogonal; 1: one contains the other.
    """
    U1 = torch.linalg.svd(dW1.detach().double().T, full_matrices=False).U  # (in, min(in, out1))
    U2 = torch.linalg.svd(dW2.detach().double().T, full_matrices=False).U  # (in, min(in, out2))
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"SeRA: in_features differ ({U1.shape[0]} vs {U2.shape[0]})")
    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):
        raise ValueError(f"SeRA: need 1 <= i={i} <= {U1.shape[1]} and 1 <= j={j} <= {U2.shape[1]}")
    return float(torch.linalg.matrix_norm(U1[:, :i].T @ U2[:, :j]) ** 2 / min(i, j))
