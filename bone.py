"""Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for LLMs (2024).

Split the frozen W (out, in) into b×b blocks W_ij (i over out/b row-blocks, j over in/b column-blocks).
The "Weight Guide" update multiplies each block by a trainable b×b matrix, so the original weights keep
steering the update throughout training:

    W'_ij = W_ij + W_ij B_g + B_g,        ΔW_ij = W_ij B_g + B_g

    grouping="col" (Bone-col, the paper's default): g = i, one B_i per output row-block,  bone_B (out/b, b, b)
    grouping="row" (Bone-row):                      g = j, one B_j per input column-block, bone_B (in/b, b, b)

Trainable parameters per layer: out·b (col), in·b (row). B = 0 at init, so W' = W. y = x W'^T + bias, and W'
is never kept alive; weight_prime() is the one place it is formed (col forward and backward, merge, analysis):
  - row: with t_j = x_j B_j^T (x_j the j-th b-chunk of x), x_j W'_ij^T = (x_j + t_j) W_ij^T + t_j, hence
    y = (x + t) W^T + tile_i(Σ_j t_j) + bias exactly: no W', no dW'; autograd does the backward.
  - col: B_i depends on the output block, so no such factorisation exists. BoneColFunction forms W' in
    forward and again in backward, keeping only x, W and B. The paper keeps W', and its Table 7 shows the
    cost in memory and throughput against LoRA (the ratios: docs/kernels.md).
  - Where it runs: these formulas in plain PyTorch on a CPU. On CUDA tensors (or under TRITON_INTERPRET=1)
    the "bone" variant runs the same maths in kernels.py: kernels.bone_row (row's x + t and Σ_j t_j) and
    kernels.bone_col_linear (W' formed in one pass, never saved). NANOPEFT_NO_TRITON=1 keeps the plain formulas.

Choices where the paper is silent:
  - Ablations (paper §4.5) as `variant`: "unconstrained" ΔW_ij = B_g (no weight guide; both groupings
    factorise, no W' formed) and "hadamard" ΔW_ij = W_ij ⊙ B_g + B_g (col only, as it needs W'; the W_ij
    term stays in W' so that B = 0 still gives W' = W).
  - Bone-col's products run in the forward's compute dtype (autocast's when it is on, as nn.Linear's would).
  - No auto-merge on eval(): merge()/unmerge() are explicit and idempotent; while merged, forward = base(x).
    A weight tied to another module (GPT-2's lm_head and its embedding) is never merged.
  - unmerge() solves W_ij = (W'_ij − B_g)(I + B_g)^{-1} in float32 (float64 for float64 weights): it raises if
    some I + B_g is singular, and loses ~cond(I + B_g)·eps. delta_weight() raises while merged (needs W).
  - apply_bone freezes everything except adapter tensors, so adapters applied before stay trainable.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:  # kernels.py beside this file, and only it: Hugging Face's `kernels` package has the same name
    import kernels as _kernels
    _kernels = _kernels if getattr(_kernels, "NANOPEFT_KERNELS", False) else None
except ImportError:
    _kernels = None

ADAPTER_PREFIXES = ("lora_", "sera_", "siva_", "bone_", "vblora_")  # every nanopeft method names its tensors so


@dataclass
class BoneConfig:
    b: int = 64  # block size (paper default); params grow linearly in b, and so did scores (Table 4)
    grouping: str = "col"  # "col": one B per output row-block (paper's Bone-col); "row": per input column-block
    variant: str = "bone"  # "bone" (ΔW = W B + B); §4.5 ablations "unconstrained" (B), "hadamard" (W ⊙ B + B)

    def __post_init__(self):
        if isinstance(self.b, bool) or not isinstance(self.b, int) or self.b < 1:
            raise ValueError(f"Bone: b={self.b!r} must be an int >= 1")
        if self.grouping not in ("col", "row"):
            raise ValueError(f"Bone: grouping={self.grouping!r} must be 'col' or 'row'")
        if self.variant not in ("bone", "unconstrained", "hadamard"):
            raise ValueError(f"Bone: variant={self.variant!r} must be 'bone', 'unconstrained' or 'hadamard'")
        if self.variant == "hadamard" and self.grouping != "col":
            raise ValueError(f"Bone: variant='hadamard' needs grouping='col', got grouping={self.grouping!r}")


def _check_divides(b, d_in, d_out):
    for name, d in (("in_features", d_in), ("out_features", d_out)):
        if d % b:
            raise ValueError(f"Bone: b={b} must divide {name}={d}")


def _blocks(W, B, grouping):
    """W in block layout and B_g broadcast over the blocks of its group (views, no copies)."""
    b = B.shape[-1]
    W4 = W.unflatten(1, (-1, b)).unflatten(0, (-1, b))  # (out/b, b, in/b, b): W4[i, :, j, :] = W_ij
    Bg = B[:, :, None, :] if grouping == "col" else B.permute(1, 0, 2)[None]  # (out/b,b,1,b) | (1,b,in/b,b)
    return W4, Bg


def weight_prime(W, B, grouping, variant):
    """W' = W + ΔW (out, in), block by block: the one place bone.py forms W'."""
    W4, Bg = _blocks(W, B, grouping)  # (out/b, b, in/b, b), B_g broadcast to it
    if variant == "bone":
        eq = "irjc,icd->irjd" if grouping == "col" else "irjc,jcd->irjd"
        Wp = torch.einsum(eq, W4, B).add_(Bg).add_(W4)  # (out/b, b, in/b, b): W_ij B_g + B_g + W_ij, in one buffer
    elif variant == "hadamard":
        Wp = (W4 * Bg).add_(Bg).add_(W4)  # (out/b, b, in/b, b): W_ij ⊙ B_g + B_g + W_ij
    else:
        Wp = W4 + Bg  # (out/b, b, in/b, b): W_ij + B_g
    return Wp.reshape(W.shape)  # (out, in)


class BoneColFunction(torch.autograd.Function):
    """y = F.linear(x, W', bias) for Bone-col ("bone" or "hadamard"); W' lives only inside forward and backward.

    With g = dL/dy, G = dL/dW' = g^T x (out, in) and its blocks G_ij:
        dx = g W'                                  (W' recomputed, then dropped)
        bone:      W'_ij = W_ij (I + B_i) + B_i  →  dB_i = Σ_j W_ij^T G_ij + Σ_j G_ij,  dW_ij = G_ij (I + B_i)^T
        hadamard:  W'_ij = W_ij ⊙ (1 + B_i) + B_i →  dB_i = Σ_j (W_ij + 1) ⊙ G_ij,     dW_ij = G_ij ⊙ (1 + B_i)
    dW only if W requires grad (apply_bone freezes it). The products run in the forward's compute dtype.
    """

    @staticmethod
    def forward(ctx, x, W, B, bias, variant):
        dev, ctx.variant = x.device.type, variant
        ctx.ct = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else W.dtype  # as nn.Linear
        ctx.save_for_backward(x, W, B)
        return F.linear(x, weight_prime(W, B, "col", variant), bias)  # (..., out)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, W, B = ctx.saved_tensors
        nx, nW, nB, nbias, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1]).to(ctx.ct)  # (N, out)
        dx = dW = dB = dbias = None
        if nx:
            dx = (g2 @ weight_prime(W, B, "col", ctx.variant).to(ctx.ct)).view(x.shape)  # (..., in) = g W'
        if nW or nB:
            G = (g2.t() @ x.reshape(-1, x.shape[-1]).to(ctx.ct)).to(W.dtype)  # (out, in) = g^T x, all tokens
            G4, _ = _blocks(G, B, "col")  # (out/b, b, in/b, b): G4[i, :, j, :] = G_ij
            W4, Bg = _blocks(W, B, "col")  # (out/b, b, in/b, b), (out/b, b, 1, b)
            guided = ctx.variant == "bone"
            if nB:  # (out/b, b, b): Σ_j W_ij^T G_ij + Σ_j G_ij  |  Σ_j (W_ij + 1) ⊙ G_ij
                dB = torch.einsum("irjc,irjd->icd", W4, G4) + G4.sum(2) if guided else ((W4 + 1) * G4).sum(2)
            if nW:  # (out, in): G_ij (I + B_i)^T  |  G_ij ⊙ (1 + B_i)
                dW = (G4 + torch.einsum("irjd,icd->irjc", G4, B) if guided else G4 * (1 + Bg)).reshape(W.shape)
        if nbias:
            dbias = g2.sum(0)  # (out,)
        return dx, dW, dB, dbias, None


class BoneLinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: BoneConfig):
        super().__init__()
        _check_divides(cfg.b, base.in_features, base.out_features)
        self.base = base.requires_grad_(False)
        self.cfg = cfg
        self.merged = False
        self.tied_to = []  # other parameters that are this weight (set by apply_bone); merge() refuses then
        d = base.out_features if cfg.grouping == "col" else base.in_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.bone_B = nn.Parameter(torch.zeros(d // cfg.b, cfg.b, cfg.b, **kw))  # W' = W at init

    def forward(self, x):
        if self.merged:
            return self.base(x)
        W, bias, B, b, variant = self.base.weight, self.base.bias, self.bone_B, self.cfg.b, self.cfg.variant
        if self.cfg.grouping == "col":
            if variant == "unconstrained":  # ΔW_ij = B_i factorises: block i of y gets (Σ_j x_j) B_i^T
                s = x.unflatten(-1, (-1, b)).sum(-2)  # (..., b) = Σ_j x_j
                return F.linear(x, W, bias) + F.linear(s, B.flatten(0, 1))  # (..., out)
            if _kernels is not None and variant == "bone" and _kernels.applies(x, W, B):  # same maths, fused
                return _kernels.bone_col_linear(x, W, B, bias)
            return BoneColFunction.apply(x, W, B, bias, variant)  # F.linear(x, W', bias), W' never kept
        if _kernels is not None and variant == "bone" and _kernels.applies(x, B):  # same maths, fused
            x_t, t_sum = _kernels.bone_row(x, B)  # (..., in), (..., b)
        else:
            t = torch.einsum("...jc,jdc->...jd", x.unflatten(-1, (-1, b)), B)  # (..., in/b, b): t_j = x_j B_j^T
            x_t = x + t.flatten(-2) if variant == "bone" else x  # (..., in): x + t ("unconstrained": no guide)
            t_sum = t.sum(-2)  # (..., b) = Σ_j t_j, summed from t itself so no digits of t are lost
        y = F.linear(x_t, W, bias)  # (..., out)
        y.unflatten(-1, (-1, b)).add_(t_sum.unsqueeze(-2))  # (..., out/b, b): Σ_j t_j into every block i
        return y

    def _float(self):
        dt = torch.promote_types(self.base.weight.dtype, torch.float32)  # float32, or float64 for float64 weights
        return self.base.weight.to(dt), self.bone_B.to(dt)

    def delta_weight(self):
        if self.merged:
            raise RuntimeError("Bone: delta_weight() needs the unmerged W; call unmerge() first")
        W, B = self._float()
        return weight_prime(W, B, self.cfg.grouping, self.cfg.variant) - W  # (out, in)

    @torch.no_grad()
    def merge(self):
        if self.tied_to:
            raise ValueError(f"Bone: cannot merge, this layer's weight is shared with {self.tied_to} (tied); "
                             "merging would change them too. Untie first, e.g. "
                             "layer.base.weight = nn.Parameter(layer.base.weight.detach().clone())")
        if not self.merged:
            W, B = self._float()
            self.base.weight.copy_(weight_prime(W, B, self.cfg.grouping, self.cfg.variant))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        Wp, B = self._float()
        Wp4, Bg = _blocks(Wp, B, self.cfg.grouping)  # (out/b, b, in/b, b): W'_ij, and B_g per block
        R = Wp4 - Bg  # (out/b, b, in/b, b): W'_ij − B_g = W_ij (I + B_g), W_ij ⊙ (1 + B_g) or W_ij
        if self.cfg.variant == "hadamard":
            if (1 + B == 0).any():
                raise RuntimeError("Bone: cannot unmerge, some 1 + B_g entry is 0; W is not recoverable from W'")
            R = R / (1 + Bg)
        elif self.cfg.variant == "bone":
            gdim = 0 if self.cfg.grouping == "col" else 2  # the axis of R that indexes the group g
            Rg = R.movedim(gdim, 0)  # (groups, ., ., b): the b-rows of every block of group g
            eye = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device)
            X, info = torch.linalg.solve_ex(eye + B, Rg.flatten(1, 2), left=False)  # X (I + B_g) = R, per group
            if (info != 0).any():
                bad = torch.nonzero(info).flatten().tolist()[:5]
                raise RuntimeError(f"Bone: cannot unmerge, I + B_g is singular for group(s) {bad}; "
                                   "W is not recoverable from W'")
            R = X.reshape(Rg.shape).movedim(0, gdim)  # (out/b, b, in/b, b): W_ij
        self.base.weight.copy_(R.reshape(Wp.shape))
        self.merged = False

    def extra_repr(self):
        return f"b={self.cfg.b}, grouping={self.cfg.grouping}, variant={self.cfg.variant}"


def bone_param_count(d_in, d_out, cfg: BoneConfig):
    """Trainable (and stored) parameters of one layer, d/b matrices of b×b: d_out·b (col), d_in·b (row)."""
    _check_divides(cfg.b, d_in, d_out)
    return (d_out if cfg.grouping == "col" else d_in) * cfg.b


def apply_bone(model, cfg, targets):
    """Wrap every targeted nn.Linear in BoneLinear and freeze all but adapter tensors; returns the names.

    A module named n is adapted iff it is an nn.Linear and n == t or n.endswith("." + t) for a t in targets.
    Adapters applied before (any method, other layers) keep their trainable tensors.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("Bone: targets is empty; name at least one nn.Linear")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hit = lambda n, t: n == t or n.endswith("." + t)
    for t in targets:
        if not any(hit(n, t) for n in linears):
            raise ValueError(f"Bone: target {t!r} matches no nn.Linear; some Linear names: {list(linears)[:6]}")
    names = [n for n in linears if any(hit(n, t) for t in targets)]
    for n in names:  # a parent that reads child.weight itself would bypass the adapter's forward
        parent = model.get_submodule(n.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"Bone: cannot adapt {n!r}: nn.MultiheadAttention reads its out_proj.weight "
                             "directly, so the adapter would be bypassed")
    layers = {n: BoneLinear(linears[n], cfg) for n in names}  # every error before any change to the model
    for n, p in model.named_parameters():
        if not any(part.startswith(ADAPTER_PREFIXES) for part in n.split(".")):
            p.requires_grad_(False)
    shared = list(model.named_parameters(remove_duplicate=False))
    for n, layer in layers.items():
        parent_name, _, child = n.rpartition(".")
        layer.tied_to = [m for m, p in shared if p is linears[n].weight and m != n + ".weight"]
        setattr(model.get_submodule(parent_name), child, layer)
    return names


def bone_state_dict(model):
    """Only the adapter tensors (bone_B of every BoneLinear)."""
    return {n: t for n, t in model.state_dict().items() if n.rpartition(".")[2].startswith("bone_")}


def load_bone_state_dict(model, sd):
    """Copy adapter tensors into a model that apply_bone adapted with the same config (strict).

    Everything is checked before anything is written."""
    own = bone_state_dict(model)
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"Bone: adapter keys differ from the model's: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for n, t in sd.items():
        if t.shape != own[n].shape:
            raise ValueError(f"Bone: {n!r} has shape {tuple(t.shape)}, the model's is {tuple(own[n].shape)} "
                             f"(different b or grouping?)")
        if not t.is_floating_point():
            raise ValueError(f"Bone: {n!r} has dtype {t.dtype}, expected a floating-point tensor")
        if not torch.isfinite(t).all():
            raise ValueError(f"Bone: {n!r} holds non-finite values (NaN or inf)")
    if any(m.merged for m in model.modules() if isinstance(m, BoneLinear)):
        raise ValueError("Bone: a layer is merged; unmerge() before loading")
    with torch.no_grad():
        for n, t in sd.items():
            own[n].copy_(t)  # state_dict tensors share storage with the parameters


@torch.no_grad()
def bone_weight_guide_norms(model):
    """Per adapted layer, the Frobenius norms of ΔW's two parts, the weight-guided term ("guide": W_ij B_g or
    W_ij ⊙ B_g) and the tiled B_g ("tile"), and of ΔW ("delta"), in float64. The paper argues the original
    weights steer the update more and more as training goes on (§1, §3); guide/tile tracks that."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BoneLinear) and not m.merged:
            W, B, g = m.base.weight.double(), m.bone_B.double(), m.cfg.grouping
            Wp = weight_prime(W, B, g, m.cfg.variant)  # (out, in): W + guide + tile
            Wt = weight_prime(W, B, g, "unconstrained")  # (out, in): W + tile
            out[name] = {"guide": (Wp - Wt).norm().item(), "tile": (Wt - W).norm().item(),
                         "delta": (Wp - W).norm().item()}
    return out
