"""SiVA: Singular Value Adaptation (anonymous, "Singular Value Adaptation for Parameter Efficient
Fine Tuning", ICLR 2025 submission).

Attach time, once per layer: thin SVD  W = U Σ V^T  (W: (out, in), n = min(out, in) singular values).
Train only k scalars s that move k singular values of W, along W's own singular vectors:

    ΔW = U_k diag(s) V_k^T          y = base(x) + ((x V_k) ⊙ s) U_k^T      (no extra scale)

k per layer (paper §3.3): the singular values whose eigenvalues σ² together hold the bottom
(1 − perc) of the variance Σσ²: sort σ² ascending and take the longest prefix whose sum is at most
(1 − perc)·Σσ²; k ≥ 1 (the conclusion's "cumulative sum of singular values" is read as §3.3's
variance, the quantity its method section defines). perc = 0.95 (the paper's ViT and RoBERTa runs) and 0.997 for LLaMA2-7B;
for GPT-2 on E2E the paper's hyper-parameter table is missing from our copy, so 0.95 there is our
assumption, as is adapting q and v.
The smallest singular values are chosen because raising them raises the effective rank most
(Theorems 2-3); s starts at zero so the adapted model starts exactly at W.

Choices where the paper (whose Algorithm 1 is missing from our copy) is silent:
- The SVD runs in float64 by default (`svd_dtype`), on W's device, whatever W's dtype: the bottom
  singular vectors are the ill-conditioned ones, and a reload must rebuild the same ΔW from W.
  float32 is allowed for very large layers where a float64 SVD is too slow.
- k rule ties: the rule runs in float64 and a share equal to 1 − perc (up to 1e-9, float64
  rounding) counts as inside, so σ² = [50, 30, 10, 6, 4] with perc = 0.9 gives k = 2 as read by hand.
- Order: siva_s[j] scales the j-th kept singular pair in the SVD's descending order
  (select="bottom": pairs n−k..n−1; select="top": pairs 0..k−1, the Table 6 "SiVA-Top" ablation
  with the same k).
- basis="random" (Table 6 "SiVA-Random"): k from W's spectrum as usual, but U_k, V_k are the Q
  factors of Gaussian (out, k) and (in, k) matrices drawn in float64 on the CPU from a generator
  seeded with cfg.seed. Same seed and shape give the same basis, so a reload rebuilds it and
  same-shaped layers share it (as VeRA shares its random matrices).
- U_k (siva_U, (out, k)) and V_k^T (siva_V, (k, in)) are non-persistent buffers in W's dtype: they
  follow .to(device) but are never saved; the adapter file holds only s (k = len(s)), and loading
  needs the same base weights and config, checked through k.
- A layer cannot be built on device="meta": k depends on the values of W.
- delta_weight() is float32 (float64 for float64 layers); merge adds it to W at that precision and
  rounds once to W's dtype.
- forward is the formula above in plain PyTorch; that is what runs on a CPU. On CUDA tensors (or
  under TRITON_INTERPRET=1) the same maths runs as kernels.lowrank_linear, one fused op.
  NANOPEFT_NO_TRITON=1 keeps the plain formula everywhere.
- No auto-merge on eval(): merge()/unmerge() are explicit; while merged, forward = base(x). A weight
  tied to another module is never merged (that would change the other module too).
- apply_siva freezes everything except adapter tensors, so adapters applied before stay trainable.
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
_TIE = 1e-9  # slack on the variance share, so exact hand-made boundaries survive float rounding


@dataclass
class SiVAConfig:
    perc: float = 0.95  # variance left frozen; paper: 0.95 for ViT/RoBERTa, 0.997 for LLMs (GPT-2: ours)
    select: str = "bottom"  # "bottom" = paper (smallest σ raise erank most); "top" = Table 6 ablation
    basis: str = "svd"  # "svd" = W's singular vectors (paper); "random" = Table 6 ablation
    svd_dtype: torch.dtype = torch.float64  # bottom singular vectors need the precision; reload must agree
    seed: int = 0  # only for basis="random": fixes the random basis so a reload rebuilds it

    def __post_init__(self):
        if not (isinstance(self.perc, (int, float)) and 0 < self.perc < 1):  # NaN fails the comparison too
            raise ValueError(f"SiVA: perc={self.perc!r} must lie in (0, 1)")
        if self.select not in ("bottom", "top"):
            raise ValueError(f"SiVA: select={self.select!r} must be 'bottom' or 'top'")
        if self.basis not in ("svd", "random"):
            raise ValueError(f"SiVA: basis={self.basis!r} must be 'svd' or 'random'")
        if self.svd_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"SiVA: svd_dtype={self.svd_dtype} must be torch.float32 or torch.float64")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"SiVA: seed={self.seed!r} must be an int")


def siva_rank(sigma, perc):
    """k = how many of the smallest singular values hold at most (1 − perc) of Σσ² (at least 1)."""
    if not 0 < perc < 1:
        raise ValueError(f"SiVA: perc={perc} must lie in (0, 1)")
    tail = sigma.detach().double().square().sort().values.cumsum(0)  # (n,) variance of the i+1 smallest
    k = int((tail <= (1 - perc + _TIE) * tail[-1]).sum())
    return max(k, 1)


class SiVALinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: SiVAConfig):
        super().__init__()
        W = base.weight
        if W.is_meta:
            raise ValueError("SiVA: k depends on the values of W; attach to real weights, not device='meta'")
        self.base = base
        self.cfg = cfg
        self.merged = False
        self.tied_to = []  # other parameters that are this weight (set by apply_siva); merge() refuses then
        base.requires_grad_(False)
        d_out, d_in = W.shape
        Wd = W.detach().to(cfg.svd_dtype)
        if cfg.basis == "svd":
            U, S, Vh = torch.linalg.svd(Wd, full_matrices=False)  # (out, n), (n,), (n, in)
        else:
            S = torch.linalg.svdvals(Wd)  # (n,)
        k = siva_rank(S, cfg.perc)
        keep = slice(0, k) if cfg.select == "top" else slice(len(S) - k, len(S))
        if cfg.basis == "svd":
            U_k, Vt_k = U[:, keep], Vh[keep]  # (out, k), (k, in)
        else:
            g = torch.Generator().manual_seed(cfg.seed)
            U_k = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64)).Q  # (out, k)
            Vt_k = torch.linalg.qr(torch.randn(d_in, k, generator=g, dtype=torch.float64)).Q.T  # (k, in)
        self.k = k
        self.register_buffer("siva_U", U_k.to(W.device, W.dtype).contiguous(), persistent=False)
        self.register_buffer("siva_V", Vt_k.to(W.device, W.dtype).contiguous(), persistent=False)
        self.siva_s = nn.Parameter(torch.zeros(k, device=W.device, dtype=W.dtype))

    def forward(self, x):
        if self.merged:
            return self.base(x)
        if _kernels is not None and _kernels.applies(x, self.siva_s):  # the same maths, fused, on the GPU
            W, bias = self.base.weight, self.base.bias
            return _kernels.lowrank_linear(x, W, bias, self.siva_V, self.siva_U, self.siva_s, 1.0)
        t = F.linear(x, self.siva_V) * self.siva_s  # (..., k): coordinates along V_k, rescaled by s
        return self.base(x) + F.linear(t, self.siva_U)  # (..., out): + ((x V_k) ⊙ s) U_k^T

    def delta_weight(self):
        ct = torch.promote_types(self.siva_s.dtype, torch.float32)  # fp32 at least, so merges round once
        return (self.siva_U.to(ct) * self.siva_s.to(ct)) @ self.siva_V.to(ct)  # (out, k) @ (k, in) = (out, in)

    @torch.no_grad()
    def merge(self):
        if self.tied_to:
            raise ValueError(f"SiVA: cannot merge, this layer's weight is shared with {self.tied_to} (tied); "
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
        return f"k={self.k}, perc={self.cfg.perc}, select={self.cfg.select}, basis={self.cfg.basis}"


def siva_param_count(d_in, d_out, cfg, k):
    """Trainable (and stored) parameters of one layer: the k singular-value shifts s."""
    if not 1 <= k <= min(d_in, d_out):
        raise ValueError(f"SiVA: k={k} must lie in [1, min(d_in={d_in}, d_out={d_out})]")
    return k


def apply_siva(model, cfg, targets):
    """Wrap every targeted nn.Linear in SiVALinear and freeze all but adapter tensors; returns the names.

    A module named n is adapted iff it is an nn.Linear and n == t or n.endswith("." + t) for a t in targets.
    Adapters applied before (any method, other layers) keep their trainable tensors.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("SiVA: targets is empty; name at least one nn.Linear")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hit = lambda n, t: n == t or n.endswith("." + t)
    for t in targets:
        if not any(hit(n, t) for n in linears):
            raise ValueError(f"SiVA: target {t!r} matches no nn.Linear; some Linear names: {list(linears)[:6]}")
    names = [n for n in linears if any(hit(n, t) for t in targets)]
    for n in names:  # a parent that reads child.weight itself would bypass the adapter's forward
        parent = model.get_submodule(n.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"SiVA: cannot adapt {n!r}: nn.MultiheadAttention reads its out_proj.weight "
                             "directly, so the adapter would be bypassed")
    layers = {n: SiVALinear(linears[n], cfg) for n in names}  # every error before any change to the model
    for n, p in model.named_parameters():
        if not any(part.startswith(ADAPTER_PREFIXES) for part in n.split(".")):
            p.requires_grad_(False)
    shared = list(model.named_parameters(remove_duplicate=False))
    for n, layer in layers.items():
        parent_name, _, child = n.rpartition(".")
        layer.tied_to = [m for m, p in shared if p is linears[n].weight and m != n + ".weight"]
        setattr(model.get_submodule(parent_name), child, layer)
    return names


def siva_state_dict(model):
    """Only the s vectors: U_k, V_k are rebuilt from W at attach time, k = len(s)."""
    return {n: t for n, t in model.state_dict().items() if n.endswith("siva_s")}


def load_siva_state_dict(model, sd):
    """Copy stored s into a model that apply_siva adapted from the same base weights and config.

    Everything is checked before anything is written."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SiVALinear)}
    wanted = {n + ".siva_s" for n in layers}
    if set(sd) != wanted:
        raise ValueError(f"SiVA: adapter keys differ from the model's: missing {sorted(wanted - set(sd))[:4]}, "
                         f"unexpected {sorted(set(sd) - wanted)[:4]}")
    for n, m in layers.items():
        s = sd[n + ".siva_s"]
        if s.numel() != m.k:
            raise ValueError(f"SiVA: layer {n!r} stores k={s.numel()} but W gives k={m.k} "
                             f"(different base weights or perc?)")
        if not torch.isfinite(s).all():
            raise ValueError(f"SiVA: {n + '.siva_s'!r} holds non-finite values (NaN or inf)")
        if m.merged:
            raise ValueError(f"SiVA: layer {n!r} is merged; unmerge() before loading")
    with torch.no_grad():
        for n, m in layers.items():
            m.siva_s.copy_(sd[n + ".siva_s"].reshape(m.k))  # (k,)


def effective_rank(W):
    """Roy & Vetterli's erank(W) = exp(H(p)), p_i = σ_i / Σσ (0·log 0 = 0)."""
    sigma = torch.linalg.svdvals(W.detach().double())  # (n,)
    total = sigma.sum()
    if total == 0:
        raise ValueError("SiVA: effective rank is undefined for a zero matrix")
    p = sigma / total
    entropy = -(p * p.clamp_min(1e-300).log()).sum()  # zero σ contribute 0
    return math.exp(float(entropy))
