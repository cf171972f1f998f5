"""Bone: Block Affine transformation as PEFT for LLMs (2024; papers/bone.txt, and SPEC §5 for its equations).

Split the frozen W (out, in) into b×b blocks W_ij (i over out/b row-blocks, j over in/b column-blocks).
The "Weight Guide" update multiplies each block by a trainable b×b matrix, so the original weights keep
steering the update throughout training:

    W'_ij = W_ij + W_ij B_g + B_g,        ΔW_ij = W_ij B_g + B_g

    grouping="col" (Bone-col, the paper's default): g = i, one B_i per output row-block,  bone_B (out/b, b, b)
    grouping="row" (Bone-row):                      g = j, one B_j per input column-block, bone_B (in/b, b, b)

B = 0 at init, so W' = W. Forward never builds W' where it can be avoided (y = x W'^T + bias):
  - row: with t_j = x_j B_j^T (x_j the j-th b-chunk of x), x_j W'_ij^T = (x_j + t_j) W_ij^T + t_j, hence
    y = (x + t) W^T + tile_i(Σ_j t_j) + bias: one extra b×b matmul per chunk, no W', no dW'. BoneRowFunction
    does this with in-place adds and contiguous grads, faster on CPU than autograd through the same maths.
  - col: B_i depends on the output block, so no such factorisation exists. BoneColFunction forms W'
    block-wise in forward, and again in backward, saving only x, W and B; the paper keeps W' alive and
    reports ~1.7× LoRA's memory (its Table 7), which this avoids.
  - With kernels.py importable (CUDA, or TRITON_INTERPRET=1) the "bone" variant runs on its Triton ops
    instead: kernels.bone_row for the row prologue, kernels.bone_col_linear for col (the same transient W',
    formed in one pass; cuBLAS for the products).

Choices where the paper/SPEC are silent:
  - Ablations (paper §4.5) as `variant`: "unconstrained" ΔW_ij = B_g (no weight guide; both groupings
    factorise like row above), "hadamard" ΔW_ij = W_ij ⊙ B_g + B_g. We keep the W_ij term in W' for
    hadamard so that B = 0 still gives W' = W. Hadamard needs W' formed, so it is offered for col only.
  - No auto-merge on eval(): merge()/unmerge() are explicit. While merged, forward = base(x).
  - unmerge() inverts the update block-wise in float32 (float64 for float64 weights):
    W_ij = (W'_ij − B_g)(I + B_g)^{-1}. It raises if some I + B_g is singular, and loses about
    cond(I + B_g)·eps of relative accuracy when I + B_g is ill-conditioned; keep a copy of W if exact
    recovery matters. delta_weight() needs the unmerged W, so it raises while merged.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:
    import kernels as _kernels
except ImportError:
    _kernels = None


@dataclass
class BoneConfig:
    b: int = 64               # block size (paper default); params grow linearly in b, and so did scores (Table 4)
    grouping: str = "col"     # "col": one B per output row-block (paper's Bone-col); "row": per input column-block
    variant: str = "bone"     # "bone" (ΔW = W B + B); §4.5 ablations "unconstrained" (B), "hadamard" (W ⊙ B + B)

    def __post_init__(self):
        if not isinstance(self.b, int) or self.b < 1:
            raise ValueError(f"Bone: b must be a positive int, got b={self.b!r}")
        if self.grouping not in ("col", "row"):
            raise ValueError(f"Bone: grouping must be 'col' or 'row', got grouping={self.grouping!r}")
        if self.variant not in ("bone", "unconstrained", "hadamard"):
            raise ValueError(f"Bone: variant must be 'bone', 'unconstrained' or 'hadamard', "
                             f"got variant={self.variant!r}")
        if self.variant == "hadamard" and self.grouping != "col":
            raise ValueError(f"Bone: variant='hadamard' needs grouping='col', got grouping={self.grouping!r}")


def _compute_dtype(x, like):
    """The dtype a layer's matmuls run in: autocast's when it is on for x's device (as in nn.Linear), else like's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else like.dtype


def _check_divides(b, d_in, d_out):
    for name, d in (("in_features", d_in), ("out_features", d_out)):
        if d % b:
            raise ValueError(f"Bone: b={b} must divide {name}={d}")


def _update_parts(W, B, grouping, variant):
    """ΔW's two parts in block layout (out/b, b, in/b, b): the weight-guided term (W_ij B_g, W_ij ⊙ B_g or
    None) and B_g tiled over its group (an expanded view, no memory)."""
    b = B.shape[-1]
    W4 = W.unflatten(1, (-1, b)).unflatten(0, (-1, b))      # (out/b, b, in/b, b): W4[i, :, j, :] = W_ij
    if grouping == "col":
        Bt = B[:, :, None, :]                                # (out/b, b, 1, b): B_i for every j
    else:
        Bt = B.permute(1, 0, 2)[None]                        # (1, b, in/b, b): B_j for every i
    if variant == "bone":
        eq = "irjc,icd->irjd" if grouping == "col" else "irjc,jcd->irjd"
        guide = torch.einsum(eq, W4, B)                      # (out/b, b, in/b, b): W_ij @ B_g
    elif variant == "hadamard":
        guide = W4 * Bt                                      # (out/b, b, in/b, b): W_ij ⊙ B_g
    else:
        guide = None
    return guide, Bt.expand_as(W4)


def _weight_prime(W, B, grouping, variant):
    """W' = W + ΔW as a fresh (out, in) tensor (one allocation for "bone" and "hadamard")."""
    guide, tile = _update_parts(W, B, grouping, variant)
    W4 = W.view_as(tile)                                     # (out/b, b, in/b, b)
    Wp = tile + W4 if guide is None else guide.add_(tile).add_(W4)
    return Wp.reshape(W.shape)                               # (out, in)


def _col_weight_prime(W, B, variant):
    """W' for Bone-col as a fresh (out, in) tensor; for "bone": B_i tiled, then W_ij (I + B_i) added by one bmm."""
    if variant != "bone":
        return _weight_prime(W, B, "col", variant)
    n_i, b = B.shape[0], B.shape[-1]
    Wp = B[:, :, None, :].expand(n_i, b, W.shape[1] // b, b).contiguous()  # (out/b, b, in/b, b): B_i per block
    eye = torch.eye(b, dtype=B.dtype, device=B.device)
    Wp.view(n_i, -1, b).baddbmm_(W.view(n_i, -1, b), B + eye)  # (out/b, in, b): row-block i as b-vectors
    return Wp.view_as(W)                                       # (out, in)


class BoneColFunction(torch.autograd.Function):
    """y = x W'^T + bias for Bone-col (variant "bone" or "hadamard"); W' lives only inside forward and backward.

    With g = dL/dy, G = dL/dW' = g^T x (out, in) and its blocks G_ij:
        dx = g W'                                  (W' recomputed, then dropped)
        bone:      W'_ij = W_ij (I + B_i) + B_i  →  dB_i = Σ_j W_ij^T G_ij + Σ_j G_ij,  dW_ij = G_ij (I + B_i)^T
        hadamard:  W'_ij = W_ij ⊙ (1 + B_i) + B_i →  dB_i = Σ_j (W_ij + 1) ⊙ G_ij,     dW_ij = G_ij ⊙ (1 + B_i)
    dW is computed only if W requires grad (it is frozen under apply_bone). Σ_j W_ij^T G_ij is one bmm per
    row-block i: viewing row-block i of W and of G as (in, b) (rows r·in/b + j) contracts r and j together.
    """

    @staticmethod
    def forward(ctx, x, W, B, bias, variant):
        ctx.save_for_backward(x, W, B)
        ctx.variant, ctx.ct = variant, _compute_dtype(x, W)
        return F.linear(x, _col_weight_prime(W, B, variant), bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, W, B = ctx.saved_tensors
        nx, nW, nB, nbias, _ = ctx.needs_input_grad
        ct = ctx.ct                                                     # the forward's matmul dtype
        g2 = g.reshape(-1, g.shape[-1]).to(ct).contiguous()             # (N, out)
        dx = dW = dB = dbias = None
        if nx:
            dx = torch.mm(g2, _col_weight_prime(W, B, ctx.variant).to(ct)).view(x.shape)  # (..., in), contiguous
        if nW or nB:
            b = B.shape[-1]
            G = torch.mm(g2.t(), x.reshape(-1, x.shape[-1]).to(ct)).to(W.dtype)  # (out, in) = g^T x, all tokens
            G4 = G.view(-1, b, G.shape[1] // b, b)                      # (out/b, b, in/b, b): G4[i, :, j, :] = G_ij
            if ctx.variant == "bone":
                Gv = G.view(-1, G.shape[1], b)                          # (out/b, in, b): row-block i as b-vectors
                if nB:
                    Wv = W.view(-1, W.shape[1], b)                      # (out/b, in, b)
                    dB = torch.baddbmm(G4.sum(2), Wv.transpose(1, 2), Gv)  # (out/b, b, b)
                if nW:
                    dW = torch.baddbmm(Gv, Gv, B.transpose(1, 2)).view_as(W)  # (out, in)
            else:
                if nB:
                    dB = ((W.view_as(G4) + 1) * G4).sum(2)              # (out/b, b, b)
                if nW:
                    dW = (G4 * (1 + B[:, :, None, :])).view_as(W)       # (out, in)
        if nbias:
            dbias = g2.float().sum(0)                                   # (out,)
        return dx, dW, dB, dbias, None


def _row_shift(x2, B):
    """(x + t, Σ_j t_j) for x2 (N, in), t_j = x_j B_j^T: one bmm over the in/b chunks.

    Σ_j t_j is summed from t itself, not as Σ(x + t) − Σx, which would lose t's digits while B is small."""
    n_j, b = B.shape[0], B.shape[-1]
    t = torch.bmm(x2.view(-1, n_j, b).transpose(0, 1), B.transpose(1, 2))  # (in/b, N, b): t_j = x_j B_j^T
    xt = x2.clone()                                              # (N, in)
    xt.view(-1, n_j, b).add_(t.transpose(0, 1))                  # (N, in/b, b) += t
    return xt, t.sum(0)                                          # (N, in), (N, b)


class BoneRowFunction(torch.autograd.Function):
    """y = (x + t) W^T + tile_i(Σ_j t_j) + bias for Bone-row, t_j = x_j B_j^T (x_j the j-th b-chunk of x).

    Neither W' nor dW' exists: forward adds t into a copy of x, and the tile into y, in place. Backward, with
    g = dL/dy, g_i its b-chunks and s = Σ_i g_i:
        dL/dt_j = (g W)_j + s  =: u_j
        dx_j = (g W)_j + u_j B_j,   dB_j = u_j^T x_j
        dW = g^T (x + t) (x + t recomputed; only if W requires grad),   dbias = Σ_rows g
    Every product runs as one bmm over the in/b chunks on strided views, and dx comes back contiguous.
    The backward's products run in the forward's matmul dtype (autocast's bf16 when it was on, as
    nn.Linear's would; B's dtype otherwise); autograd casts the grads back to the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, x, W, B, bias):
        b = B.shape[-1]
        x2 = x.reshape(-1, x.shape[-1]).to(B.dtype)                  # (N, in)
        xt, t_sum = _row_shift(x2, B)                                # (N, in) = x + t, (N, b) = Σ_j t_j
        y = F.linear(xt, W, bias)                                    # (N, out)
        y.view(y.shape[0], -1, b).add_(t_sum.unsqueeze(1))          # (N, out/b, b): Σ_j t_j into every block
        ctx.save_for_backward(x2, W, B)
        ctx.x_shape, ctx.ct = x.shape, _compute_dtype(x, B)
        return y.view(*x.shape[:-1], W.shape[0])                     # (..., out)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x2, W, B = ctx.saved_tensors
        nx, nW, nB, nbias = ctx.needs_input_grad
        n_j, b = B.shape[0], B.shape[-1]
        ct = ctx.ct                                                  # the forward's matmul dtype
        g2 = g.reshape(-1, g.shape[-1]).to(ct).contiguous()          # (N, out)
        W = W.to(ct)
        dx = dW = dB = dbias = None
        if nx or nB:
            s = g2.view(g2.shape[0], -1, b).sum(1)                   # (N, b) = Σ_i g_i
            gW = torch.mm(g2, W)                                     # (N, in) = g W
            u = gW.view(-1, n_j, b) + s.unsqueeze(1)                 # (N, in/b, b): u_j = (g W)_j + s
            if nB:
                xc = x2.to(ct).view(-1, n_j, b)                      # (N, in/b, b)
                dB = torch.bmm(u.permute(1, 2, 0), xc.transpose(0, 1)).to(B.dtype)  # (in/b, b, b): u_j^T x_j
            if nx:
                gW.view(-1, n_j, b).transpose(0, 1).baddbmm_(u.transpose(0, 1), B.to(ct))  # (in/b, N, b) += u_j B_j
                dx = gW.view(ctx.x_shape)                            # (..., in)
        if nW:
            dW = torch.mm(g2.t(), _row_shift(x2, B)[0].to(ct))       # (out, in)
        if nbias:
            dbias = g2.float().sum(0)                                # (out,)
        return dx, dW, dB, dbias


class BoneLinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: BoneConfig):
        super().__init__()
        _check_divides(cfg.b, base.in_features, base.out_features)
        self.base = base.requires_grad_(False)
        self.cfg = cfg
        d = base.out_features if cfg.grouping == "col" else base.in_features
        w = base.weight
        self.bone_B = nn.Parameter(torch.zeros(d // cfg.b, cfg.b, cfg.b, device=w.device, dtype=w.dtype))
        self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base(x)
        W, bias, B, cfg = self.base.weight, self.base.bias, self.bone_B, self.cfg
        kern = _kernels is not None and cfg.variant == "bone"
        if cfg.grouping == "col" and cfg.variant != "unconstrained":
            if kern and _kernels.enabled(x, W, B):
                return _kernels.bone_col_linear(x, W, B, bias)
            return BoneColFunction.apply(x, W, B, bias, cfg.variant)
        if cfg.grouping == "col":
            s = x.unflatten(-1, (-1, cfg.b)).sum(-2)                  # (..., b) = Σ_j x_j
            return F.linear(x, W, bias) + F.linear(s, B.reshape(-1, cfg.b))  # (..., out): block i gets s B_i^T
        if kern and _kernels.enabled(x, B):
            x_t, t_sum = _kernels.bone_row(x, B)                      # (..., in), (..., b)
        elif cfg.variant == "bone":
            return BoneRowFunction.apply(x, W, B, bias)
        else:
            x_t = x
            t_sum = torch.einsum("...jc,jdc->...d", x.unflatten(-1, (-1, cfg.b)), B)  # (..., b) = Σ_j x_j B_j^T
        y = F.linear(x_t, W, bias)
        y.unflatten(-1, (-1, cfg.b)).add_(t_sum.unsqueeze(-2))       # (..., out/b, b): Σ_j t_j into every block
        return y

    def _float(self):
        dt = torch.promote_types(self.base.weight.dtype, torch.float32)  # float32, or float64 for float64 weights
        return self.base.weight.to(dt), self.bone_B.to(dt)

    def delta_weight(self):
        if self.merged:
            raise RuntimeError("Bone: delta_weight() needs the unmerged W; call unmerge() first")
        W, B = self._float()
        return _weight_prime(W, B, self.cfg.grouping, self.cfg.variant) - W  # (out, in)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            W, B = self._float()
            self.base.weight.copy_(_weight_prime(W, B, self.cfg.grouping, self.cfg.variant))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        Wp, B = self._float()
        b, col = self.cfg.b, self.cfg.grouping == "col"
        tile = _update_parts(Wp, B, self.cfg.grouping, "unconstrained")[1]  # (out/b, b, in/b, b): B_g per block
        R = Wp.view_as(tile) - tile                                   # (out/b, b, in/b, b): W'_ij − B_g
        if self.cfg.variant == "unconstrained":
            W = R.reshape(Wp.shape)                                   # (out, in)
        elif self.cfg.variant == "hadamard":
            if (1 + B == 0).any():
                raise RuntimeError("Bone: cannot unmerge, some 1 + B_g entry is 0; W is not recoverable from W'")
            W = (R / (1 + tile)).reshape(Wp.shape)                    # (out, in)
        else:
            # W_ij (I + B_g) = W'_ij − B_g for every block of group g: one right-solve per group
            R = R.flatten(1, 2) if col else R.permute(2, 0, 1, 3).flatten(1, 2)  # (groups, b·blocks, b)
            eye = torch.eye(b, dtype=B.dtype, device=B.device)
            X, info = torch.linalg.solve_ex(eye + B, R, left=False)   # (groups, b·blocks, b): X (I + B_g) = R
            if (info != 0).any():
                bad = torch.nonzero(info).flatten().tolist()[:5]
                raise RuntimeError(f"Bone: cannot unmerge, I + B_g is singular for group(s) {bad}; "
                                   "W is not recoverable from W'")
            if col:
                W = X.reshape(Wp.shape)                               # (out, in)
            else:
                W = X.unflatten(1, (-1, b)).permute(1, 2, 0, 3).reshape(Wp.shape)  # (in/b, out/b, b, b) -> (out, in)
        self.base.weight.copy_(W)
        self.merged = False

    def extra_repr(self):
        return f"b={self.cfg.b}, grouping={self.cfg.grouping}, variant={self.cfg.variant}"


def bone_param_count(d_in, d_out, cfg: BoneConfig):
    """(d/b) matrices of b×b: d_out·b for col, d_in·b for row."""
    _check_divides(cfg.b, d_in, d_out)
    return (d_out if cfg.grouping == "col" else d_in) * cfg.b


def apply_bone(model: nn.Module, cfg: BoneConfig, targets):
    """Freeze the whole model, wrap every targeted nn.Linear in BoneLinear; returns the adapted names.

    A module named n is adapted iff it is an nn.Linear and n == t or n.endswith("." + t) for a t in targets.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    model.requires_grad_(False)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    hit = lambda n, t: n == t or n.endswith("." + t)
    for t in targets:
        if not any(hit(n, t) for n in linears):
            raise ValueError(f"Bone: target {t!r} matches no nn.Linear; some Linear names: {linears[:6]}")
    names = [n for n in linears if any(hit(n, t) for t in targets)]
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, BoneLinear(getattr(parent, child), cfg))
    return names


def bone_state_dict(model: nn.Module):
    """Only the adapter tensors (bone_B of every BoneLinear)."""
    return {n: t for n, t in model.state_dict().items() if n.rpartition(".")[2].startswith("bone_")}


def load_bone_state_dict(model: nn.Module, sd):
    """Copy adapter tensors into a model that apply_bone adapted with the same config (strict)."""
    own = bone_state_dict(model)
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"Bone: adapter keys differ from the model's: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for n, t in sd.items():
        if t.shape != own[n].shape:
            raise ValueError(f"Bone: {n!r} has shape {tuple(t.shape)}, the model's is {tuple(own[n].shape)} "
                             f"(different b or grouping?)")
    if any(m.merged for m in model.modules() if isinstance(m, BoneLinear)):
        raise ValueError("Bone: a layer is merged; unmerge() before loading")
    with torch.no_grad():
        for n, t in sd.items():
            own[n].copy_(t)  # state_dict tensors share storage with the parameters


@torch.no_grad()
def bone_weight_guide_norms(model: nn.Module):
    """Per adapted layer, the Frobenius norms of ΔW's two parts: the weight-guided term ("guide", W_ij B_g or
    W_ij ⊙ B_g; 0 for "unconstrained") and the tiled B_g ("tile"), plus ‖ΔW‖ ("delta"). The paper argues the
    original weights steer the update more and more as training goes on (§1, §3); guide/tile tracks that."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BoneLinear) and not m.merged:
            W, B = m._float()
            guide, tile = _update_parts(W, B, m.cfg.grouping, m.cfg.variant)
            delta = tile if guide is None else guide + tile
            out[name] = {"guide": 0.0 if guide is None else guide.norm().item(),
                         "tile": tile.norm().item(), "delta": delta.norm().item()}
    return out
