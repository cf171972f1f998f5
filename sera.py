"""SeRA: Vector Segmented and Recombined Adaptation (anonymous, ICLR 2025 submission; papers/sera.txt).

The paper writes layers in row-vector form, h = x W0 + x ΔW (Eq. 1), with

    ΔW = A C B,   A = blockdiag(A_1 .. A_split),  A_i: (in/split, r/split)    (Eq. 2)
                  C: (r, r)
                  B = blockdiag(B_1 .. B_split),  B_i: (r/split, out/split)

so x is cut into `split` segments, each reduced on its own by A_i, the reduced segments are mixed
by the square C (the role W_o plays in multi-head attention), and the result is cut again and each
segment expanded by B_i. In torch's (out, in) layout the update is delta_weight() = scale * (A C B)^T.
Trainable parameters per layer (§3.2): (in + out) * r/split + r^2.

Choices where the paper is silent (SPEC §3 decides the rest):
- scale = alpha / r, LoRA's convention (§3.1: "consistent with LoRA, we scale xΔW by α, a
  constant"). The paper's hyper-parameter appendix is missing from our copy; alpha = 16 is the
  (r=8, α=16) of the LoRA RoBERTa-large GLUE recipe that §4.4 says SeRA follows. Keep alpha fixed
  while sweeping r, as LoRA does.
- Init: A_i and C follow kaiming_uniform_(a=sqrt(5)) (the paper's "Kaiming", loralib's rule), A with
  the per-block fan-in in/split as in MELoRA; B = 0, so the adapted model starts exactly at W0.
- dropout (default 0, the paper names none) acts on x before A, as in LoRA.
- The forward never builds blockdiag(A), blockdiag(B) or ΔW: x is viewed as (N, split, in/split) and
  multiplied segment-wise, N * ((in + out) * r/split + r^2) multiply-adds. delta_weight() forms only
  the non-zero blocks of ΔW (for merging and analysis).
- delta_weight() is float32 (float64 for float64 layers); merge() adds it to W at that precision and
  rounds once to W's dtype.
- No auto-merge on eval(): merge()/unmerge() are explicit and idempotent; while merged, forward = base(x).
- subspace_similarity (Eq. 4) takes U = the left singular vectors of the paper's ΔW (in, out), i.e.
  of delta_weight().T: directions in the layer's input space ("column singular directions"), as the
  LoRA paper's φ does for its input-side A.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

try:
    import kernels as _kernels
except ImportError:
    _kernels = None


@dataclass
class SeRAConfig:
    r: int = 8  # width of the mixing space (C is r x r); the paper's CLIP and GLUE runs use 8
    split: int = 8  # segments of x and of the output; the paper's default is split = r (§4)
    alpha: float = 16.0  # scale = alpha / r (LoRA's convention); 16 as in LoRA's RoBERTa-large recipe
    dropout: float = 0.0  # on x before A; the paper uses none

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"SeRA: r={self.r} must be >= 1")
        if self.split < 1:
            raise ValueError(f"SeRA: split={self.split} must be >= 1")
        if self.r % self.split:
            raise ValueError(f"SeRA: split={self.split} must divide r={self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SeRA: dropout={self.dropout} must lie in [0, 1)")


class SeRAFunction(torch.autograd.Function):
    """y += scale * x blockdiag(A) C blockdiag(B), segment-wise in plain PyTorch (where Triton is off).

    Autograd through the einsum version is correct but slow on CPU: einsum picks operand layouts that
    CPU BLAS runs 3-10x slower than their transposes, and y + ... allocates a second (N, out) tensor.
    Here every product is one bmm/mm in its fast layout, the narrow tensors are kept transposed
    ((r, N), contiguous), and the update goes into the fresh base output y in place.
    Row-vector form, per segment s (x_s (N, in/split), g_s = dL/dy_s (N, out/split)):
        forward:  h_s = x_s A_s,  z = scale h C,  y_s += z_s B_s                  (h, z: (N, r))
        backward: dz_s = g_s B_s^T,  dB_s = z_s^T g_s,  dC = scale h^T dz,
                  dh = scale dz C^T,  dA_s = x_s^T dh_s,  dx_s = dh_s A_s^T
    """

    @staticmethod
    def forward(ctx, y, x, A, C, B, scale):
        ct = y.dtype  # compute in the activations' dtype (bf16 under autocast, fp32 adapter weights)
        s, i, a = A.shape
        xs = x.reshape(-1, s, i).to(ct)  # (N, split, in/split)
        At, Ct, Bt = A.to(ct), C.to(ct), B.to(ct)
        hT = torch.bmm(At.transpose(1, 2), xs.permute(1, 2, 0))  # (split, r/split, N): h_s^T = A_s^T x_s^T
        zT = (scale * Ct.t()) @ hT.view(s * a, -1)  # (r, N): z^T = scale C^T h^T
        ys = y.view(-1, s, B.shape[-1]).transpose(0, 1)  # (split, N, out/split), a strided view of y
        ys.baddbmm_(zT.view(s, a, -1).transpose(1, 2), Bt)  # y_s += z_s B_s, (N, r/split) @ (r/split, out/split)
        ctx.mark_dirty(y)
        ctx.save_for_backward(xs, At, Ct, Bt, hT, zT)
        ctx.scale, ctx.x_shape, ctx.dtypes = scale, x.shape, (x.dtype, A.dtype, C.dtype, B.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        xs, A, C, B, hT, zT = ctx.saved_tensors
        _, nx, nA, nC, nB, _ = ctx.needs_input_grad
        (n, s, i), a = xs.shape, A.shape[-1]
        gs = g.reshape(n, s, -1).to(xs.dtype)  # (N, split, out/split)
        dx = dA = dC = dB = None
        if nB:
            dB = torch.bmm(zT.view(s, a, n), gs.transpose(0, 1)).to(ctx.dtypes[3])  # (split, r/split, out/split)
        if nx or nA or nC:
            dzT = torch.bmm(B, gs.permute(1, 2, 0)).view(s * a, n)  # (r, N): dz_s^T = B_s g_s^T
        if nC:
            dC = (ctx.scale * (hT.view(s * a, n) @ dzT.t())).to(ctx.dtypes[2])  # (r, r)
        if nx or nA:
            dhT = ((ctx.scale * C) @ dzT).view(s, a, n)  # (split, r/split, N): dh^T = scale C dz^T
        if nA:
            dAT = torch.bmm(dhT, xs.transpose(0, 1))  # (split, r/split, in/split): dA_s^T = dh_s^T x_s
            dA = dAT.transpose(1, 2).contiguous().to(ctx.dtypes[1])  # (split, in/split, r/split)
        if nx:
            # a fresh contiguous tensor, not a view: autograd can then add x's other gradient into it in place
            dx = xs.new_empty(ctx.x_shape)  # (..., in)
            dxs = dx.view(n, s, i).transpose(0, 1)  # (split, N, in/split), a strided view of dx
            torch.bmm(dhT.transpose(1, 2), A.transpose(1, 2), out=dxs)  # dx_s = dh_s A_s^T
            dx = dx.to(ctx.dtypes[0])
        return g if ctx.needs_input_grad[0] else None, dx, dA, dC, dB, None


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
        xd = self.dropout(x)
        A, C, B = self.sera_A, self.sera_C, self.sera_B
        if _kernels is not None and _kernels.enabled(xd, A, C, B):
            return self.base(x) + _kernels.sera_delta(xd, A, C, B, self.scale)
        # nn.Linear returns a view for 3-D x, and an in-place update of a view makes autograd copy the
        # whole gradient in backward (CopySlices); a 2-D base output is a tensor of its own
        y = self.base(x.reshape(-1, x.shape[-1]))  # (N, out)
        return SeRAFunction.apply(y, xd, A, C, B, self.scale).view(*x.shape[:-1], -1)  # (..., out)

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
    """Freeze the whole model, wrap every targeted nn.Linear in SeRALinear; returns the adapted names.

    A module named n is adapted iff it is an nn.Linear and n == t or n.endswith("." + t) for a t in targets.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    model.requires_grad_(False)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    hit = lambda n, t: n == t or n.endswith("." + t)
    for t in targets:
        if not any(hit(n, t) for n in linears):
            raise ValueError(f"SeRA: target {t!r} matches no nn.Linear; some Linear names: {linears[:6]}")
    names = [n for n in linears if any(hit(n, t) for t in targets)]
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, SeRALinear(getattr(parent, child), cfg))
    return names


def sera_state_dict(model):
    """Only the adapter tensors (sera_A, sera_C, sera_B of every SeRALinear)."""
    return {n: t for n, t in model.state_dict().items() if n.rpartition(".")[2].startswith("sera_")}


def load_sera_state_dict(model, sd):
    """Copy adapter tensors into a model that apply_sera adapted with the same config (strict)."""
    own = sera_state_dict(model)
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"SeRA: adapter keys differ from the model's: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for n, t in sd.items():
        if t.shape != own[n].shape:
            raise ValueError(f"SeRA: {n!r} has shape {tuple(t.shape)}, the model's is {tuple(own[n].shape)} "
                             f"(different r/split?)")
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
