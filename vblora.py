"""VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks (Li, Han, Ji, NeurIPS 2024).

LoRA's ΔW = B A is rebuilt from one vector bank {α_1..α_h} ⊂ R^b shared by every adapted layer. Each row
of A (length in) and each column of B (length out) is cut into sub-vectors of length b, and every
sub-vector is a top-k admixture of bank vectors with its own logits σ ∈ R^h (Eq. 3.3):

    u = Σ_{s ∈ topk(σ)} softmax(σ_topk)_s · α_s          y = base(x) + (x A^T) B^T   (no scale)

Per layer: vblora_logits_A (r, in/b, h) and vblora_logits_B (out/b, r, h), init N(0, 0.01); the bank (h, b)
is init U(−0.02, 0.02) (Table 7). A = u_A.reshape(r, in); B = u_B (out/b, r, b) → transpose(1, 2) →
reshape(out, r). That is Hugging Face PEFT's layout: its logits load as they are. The authors' own code
(github.com/leo-yangli/VB-LoRA) stores logits_A as (in/b, r, h): convert with from_authors_state_dict (a
plain load would pass silently where in/b = r, e.g. d=1024, b=256, r=4). Paper defaults: r=4, b=256, k=2,
h=256 (GPT-2 Medium), 350 (GPT-2 Large), 90 (RoBERTa), 2048 (7B models); AdamW lr 1e-3 for the bank and
1e-2 for the logits. No weight decay on either: that comes from the authors' public NLU and instruction-
tuning code; the paper's E2E Table 8 lists weight decay 0.01 without saying for which tensors.

Choices where the paper is silent:
- Hard top-k without noise, identical in train and eval (Sec. 3.2, Table 5); ties go to torch.topk.
- One batched composition per forward of the model: apply_vblora registers a forward pre-hook on the
  model that stacks every layer's logit rows (S_total, h), composes once, splits per layer and hands
  each layer its (A, B); a forward hook (always called) takes them back, so nothing outlives the
  forward. A layer called on its own composes its own. As every forward composes afresh, gradient
  accumulation, optimizer steps, `.data` edits, autocast and no_grad need nothing from the user.
  (Activation checkpointing inside the model: use_reentrant=True, or checkpoint the whole model; a
  non-reentrant recompute of an inner block composes its own A, B and fails torch's saved-tensor check.)
- The composition runs in the bank's dtype outside autocast.
- The model holds the bank once, as `model.vblora_bank` (key `vblora_bank.vectors`); layers keep a plain
  reference. The bank's forward is the identity, as an nn.Sequential runs it as a last stage.
- Stored size (Sec. 3.4), in float32 equivalents, the paper's accounting: the bank, k−1 weights per
  sub-vector (the last is 1 − Σ) and k indices at 1 byte if h ≤ 256, else 4 (every count the paper gives
  with h > 256 needs 4). vblora_state_dict(compact=True) ships that form, with uint16 indices for
  256 < h ≤ 65536: such a file is smaller than the paper's count. compact=False ships full logits, to
  resume training. A compact load writes logits log(w) at the indices and the dtype's lowest value
  elsewhere: the same selection and weights (up to rounding), for inference only (they never select anew).
- forward is the formula in plain PyTorch; that is what runs on a CPU. On CUDA tensors (or under
  TRITON_INTERPRET=1) the same maths runs as kernels.vblora_compose and kernels.lowrank_linear.
- delta_weight() is float32 (float64 for float64 layers); merge() adds it at that precision and rounds
  once. merge()/unmerge() are explicit (no auto-merge on eval()); a tied weight is never merged.
- apply_vblora freezes everything except adapter tensors, so adapters applied before (any nanopeft method)
  stay trainable; one bank per model, so a second apply_vblora raises.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

try:  # kernels.py beside this file, and only it: Hugging Face's `kernels` package has the same name
    import kernels as _kernels
    _kernels = _kernels if getattr(_kernels, "NANOPEFT_KERNELS", False) else None
except ImportError:
    _kernels = None

ADAPTER_PREFIXES = ("lora_", "sera_", "siva_", "bone_", "vblora_")  # every nanopeft method names its tensors so


@dataclass
class VBLoRAConfig:
    r: int = 4  # LoRA rank of the composed A, B (paper: 4 everywhere but Llama2-13B)
    b: int = 256  # sub-vector length; must divide every adapted in/out size (Table 6: 256 is best)
    h: int = 256  # bank size: 256 for GPT-2 Medium, 350 GPT-2 Large, 90 RoBERTa, 2048 for 7B models
    k: int = 2  # vectors mixed per sub-vector; k=2 beats k=1 and costs one weight per sub-vector (Table 5)
    init_logits_std: float = 0.01  # N(0, 0.01) (Table 7): near-uniform start, so top-k can still move
    init_bank_bound: float = 0.02  # U(-0.02, 0.02) (Table 7): ΔW starts small but non-zero

    def __post_init__(self):
        for name in ("r", "b", "h", "k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"VB-LoRA: {name}={v!r} must be an int >= 1")
        if self.k > self.h:
            raise ValueError(f"VB-LoRA: k={self.k} must be <= h={self.h}")
        std, bound = self.init_logits_std, self.init_bank_bound
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
            raise ValueError(f"VB-LoRA: init_logits_std={std!r} must be a finite number >= 0")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
            raise ValueError(f"VB-LoRA: init_bank_bound={bound!r} must be a finite number > 0")


def topk_admixture(logits, bank, k):
    """(S, h) logits, (h, b) bank -> (S, b): softmax over each row's top-k logits, mix those bank rows."""
    top, idx = logits.topk(k, dim=-1)  # (S, k)
    w = top.softmax(dim=-1)  # (S, k)
    return torch.einsum("sk,skb->sb", w, bank[idx])  # bank[idx]: (S, k, b) -> (S, b)


class VBLoRABank(nn.Module):
    """The shared vector bank (h, b) and its layers in a fixed order; composes their A, B in one op."""

    def __init__(self, cfg: VBLoRAConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.vectors = nn.Parameter(torch.empty(cfg.h, cfg.b, device=device, dtype=dtype))
        nn.init.uniform_(self.vectors, -cfg.init_bank_bound, cfg.init_bank_bound)
        self.layers = []  # plain list, not a ModuleList: the model owns the layers
        self.adapted_names = []  # qualified names, filled by apply_vblora

    def forward(self, x):
        # the bank is a child of the model; in an nn.Sequential that makes it a stage, which passes through
        return x

    def compose(self, layers):
        """[(A (r, in), B (out, r))] for `layers`, every sub-vector of them in one op."""
        cfg, vec = self.cfg, self.vectors
        logits = [t for l in layers for t in (l.vblora_logits_A, l.vblora_logits_B)]
        with torch.autocast(vec.device.type, enabled=False):  # in the bank's dtype, whatever the autocast state
            flat = torch.cat([t.reshape(-1, cfg.h) for t in logits])  # (S_total, h)
            if _kernels is not None and _kernels.applies(flat, vec):
                subs = _kernels.vblora_compose(flat, vec, cfg.k)  # (S_total, b)
            else:
                subs = topk_admixture(flat, vec, cfg.k)  # (S_total, b)
        pieces = subs.split([t.numel() // cfg.h for t in logits])
        out = []
        for l, pa, pb in zip(layers, pieces[0::2], pieces[1::2]):
            A = pa.reshape(cfg.r, l.in_features)  # (r * in/b, b) -> (r, in)
            B = pb.reshape(-1, cfg.r, cfg.b).transpose(1, 2)  # (out/b, r, b) -> (out/b, b, r)
            out.append((A, B.reshape(l.out_features, cfg.r)))  # (out, r)
        return out

    def hand_out(self, model, args):
        """Forward pre-hook on the adapted model: compose every unmerged layer once for this forward."""
        live = [l for l in self.layers if not l.merged]
        for l, AB in zip(live, self.compose(live) if live else []):
            l.composed = AB

    def take_back(self, model, args, output):
        """Forward hook (always called, even when the forward raised): nothing outlives the forward."""
        for l in self.layers:
            l.composed = None


class VBLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: VBLoRAConfig, bank: VBLoRABank):
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        for what, d in (("in_features", d_in), ("out_features", d_out)):
            if d % cfg.b:
                raise ValueError(f"VB-LoRA: b={cfg.b} must divide {what}={d}")
        if tuple(bank.vectors.shape) != (cfg.h, cfg.b) or bank.cfg.k != cfg.k or bank.cfg.r != cfg.r:
            raise ValueError(f"VB-LoRA: bank (h, b)={tuple(bank.vectors.shape)}, k={bank.cfg.k}, "
                             f"r={bank.cfg.r} do not match config h={cfg.h}, b={cfg.b}, k={cfg.k}, r={cfg.r}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = d_in, d_out
        self.r, self.b, self.k = cfg.r, cfg.b, cfg.k
        self.merged = False
        self.tied_to = []  # other parameters that are this weight (set by apply_vblora); merge() refuses then
        self.composed = None  # (A, B) handed over by the model's pre-hook for one forward, else None
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.vblora_logits_A = nn.Parameter(torch.empty(cfg.r, d_in // cfg.b, cfg.h, **kw))
        self.vblora_logits_B = nn.Parameter(torch.empty(d_out // cfg.b, cfg.r, cfg.h, **kw))
        nn.init.normal_(self.vblora_logits_A, std=cfg.init_logits_std)
        nn.init.normal_(self.vblora_logits_B, std=cfg.init_logits_std)
        object.__setattr__(self, "bank", bank)  # plain reference: the model, not each layer, owns it

    def forward(self, x):
        if self.merged:
            return self.base(x)
        A, B = self.composed if self.composed is not None else self.bank.compose([self])[0]  # (r, in), (out, r)
        if _kernels is not None and _kernels.applies(x, A):  # the same maths, fused, on the GPU
            return _kernels.lowrank_linear(x, self.base.weight, self.base.bias, A, B, None, 1.0)
        return self.base(x) + (x @ A.t()) @ B.t()  # (..., in) -> (..., r) -> (..., out); no scale

    def delta_weight(self):
        A, B = self.bank.compose([self])[0]
        ct = torch.promote_types(A.dtype, torch.float32)  # fp32 at least, so merges round once
        return B.to(ct) @ A.to(ct)  # (out, r) @ (r, in) -> (out, in)

    @torch.no_grad()
    def merge(self):
        if self.tied_to:
            raise ValueError(f"VB-LoRA: cannot merge, this layer's weight is shared with {self.tied_to} (tied); "
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
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, b={self.b}, k={self.k}"


def vblora_param_count(d_in, d_out, cfg):
    """Trainable logits of one layer. The bank (h·b) is shared and counted once per model."""
    return cfg.r * (d_in // cfg.b) * cfg.h + (d_out // cfg.b) * cfg.r * cfg.h


def vblora_stored_param_count(model):
    """Float32 equivalents shipped, by the paper's accounting (Sec. 3.4): h·b + S·(k−1) + S·k·bytes/4,
    S = sub-vectors, an index taking 1 byte if h <= 256, else 4. For k=2, h <= 256: h·b + 3·L·M·r·(d/b).
    (vblora_state_dict stores uint16 indices for 256 < h <= 65536, a smaller file than this count.)"""
    bank = _find_bank(model)[1]
    h, b, k = bank.cfg.h, bank.cfg.b, bank.cfg.k
    S = sum((l.vblora_logits_A.numel() + l.vblora_logits_B.numel()) // h for _, l in _layers(model))
    quarters = 4 * (h * b + S * (k - 1)) + S * k * (1 if h <= 256 else 4)  # an index byte = 1/4 float
    return quarters // 4 if quarters % 4 == 0 else quarters / 4


def apply_vblora(model, cfg, targets):
    """Swap the targeted nn.Linears for VBLoRALinear around one new shared bank; return the bank.

    A module named n is adapted iff it is an nn.Linear and n == t or n.endswith("." + t) for a t in targets.
    Adapters applied before (any method, other layers) keep their trainable tensors."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("VB-LoRA: targets is empty; name at least one nn.Linear")
    if hasattr(model, "vblora_bank"):
        raise ValueError("VB-LoRA: model already has a vblora_bank; apply_vblora once per model")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    hit = lambda n, t: n == t or n.endswith("." + t)
    for t in targets:
        if not any(hit(n, t) for n in linears):
            raise ValueError(f"VB-LoRA: target {t!r} matches no nn.Linear; some Linear names: {list(linears)[:6]}")
    names = [n for n in linears if any(hit(n, t) for t in targets)]
    for n in names:  # a parent that reads child.weight itself would bypass the adapter's forward
        if isinstance(model.get_submodule(n.rpartition(".")[0]), nn.MultiheadAttention):
            raise ValueError(f"VB-LoRA: cannot adapt {n!r}: nn.MultiheadAttention reads its out_proj.weight "
                             "directly, so the adapter would be bypassed")
    w = linears[names[0]].weight
    bank = VBLoRABank(cfg, device=w.device, dtype=w.dtype)
    layers = {n: VBLoRALinear(linears[n], cfg, bank) for n in names}  # every error before any change
    for n, p in model.named_parameters():
        if not any(part.startswith(ADAPTER_PREFIXES) for part in n.split(".")):
            p.requires_grad_(False)
    shared = list(model.named_parameters(remove_duplicate=False))
    for n, layer in layers.items():
        parent_name, _, child = n.rpartition(".")
        layer.tied_to = [m for m, p in shared if p is linears[n].weight and m != n + ".weight"]
        setattr(model.get_submodule(parent_name), child, layer)
    model.vblora_bank = bank
    bank.layers, bank.adapted_names = list(layers.values()), names
    bank.hooks = [model.register_forward_pre_hook(bank.hand_out),  # one composition per forward of the model
                  model.register_forward_hook(bank.take_back, always_call=True)]  # handles: a failed load undoes it
    return bank


def _find_bank(model):
    """(the bank's state-dict key, the bank) of a model apply_vblora adapted."""
    banks = [m for m in model.modules() if isinstance(m, VBLoRABank)]
    if len(banks) != 1:
        raise ValueError(f"VB-LoRA: expected one VBLoRABank in the model, found {len(banks)}")
    return next(n for n, p in model.named_parameters() if p is banks[0].vectors), banks[0]


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, VBLoRALinear)]


def _index_dtype(h):
    return torch.uint8 if h <= 256 else torch.uint16 if h <= 65536 else torch.int32


def vblora_state_dict(model, compact=True):
    """Adapter tensors only. compact=True: bank + top-k indices + first k−1 weights per sub-vector
    (what the paper ships); compact=False: bank + full logits (to resume training)."""
    key, bank = _find_bank(model)
    sd = {key: bank.vectors.detach().clone()}
    for n, l in _layers(model):
        for side in ("A", "B"):
            logits = getattr(l, "vblora_logits_" + side).detach()
            if not compact:
                sd[f"{n}.vblora_logits_{side}"] = logits.clone()
                continue
            top, idx = logits.topk(l.k, dim=-1)  # (..., k)
            sd[f"{n}.vblora_idx_{side}"] = idx.to(_index_dtype(bank.cfg.h))
            sd[f"{n}.vblora_w_{side}"] = top.softmax(dim=-1)[..., :-1].clone()  # (..., k-1)
    return sd


@torch.no_grad()
def load_vblora_state_dict(model, sd):
    """Load either form of vblora_state_dict (told apart by its keys); everything is checked before
    anything is written: keys, shapes, dtypes, finite values, weights in [0, 1] that leave the last >= 0,
    k distinct indices in [0, h)."""
    key, bank = _find_bank(model)
    h, compact = bank.cfg.h, any(n.endswith(".vblora_idx_A") for n in sd)
    shapes = {key: bank.vectors.shape}
    for n, l in _layers(model):
        for s in ("A", "B"):
            shape = getattr(l, "vblora_logits_" + s).shape  # (..., h)
            if compact:  # k indices and k-1 weights per sub-vector
                shapes[f"{n}.vblora_idx_{s}"] = shape[:-1] + (l.k,)
                shapes[f"{n}.vblora_w_{s}"] = shape[:-1] + (l.k - 1,)
            else:
                shapes[f"{n}.vblora_logits_{s}"] = shape
    missing, unexpected = sorted(shapes.keys() - sd.keys()), sorted(sd.keys() - shapes.keys())
    if missing or unexpected:
        raise ValueError(f"VB-LoRA: state dict keys differ; missing {missing[:4]}, unexpected {unexpected[:4]}")
    for n, t in sd.items():
        if t.shape != shapes[n]:
            raise ValueError(f"VB-LoRA: {n} has shape {tuple(t.shape)}, model expects {tuple(shapes[n])}")
        if ".vblora_idx_" in n:
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"VB-LoRA: {n} holds {t.dtype} indices; expected an integer dtype")
            i = t.long()  # (..., k)
            if i.numel() and (i.min() < 0 or i.max() >= h or (i.sort(-1).values.diff(dim=-1) == 0).any()):
                raise ValueError(f"VB-LoRA: {n} holds indices outside [0, h={h}) or repeated in a row")
        elif not t.is_floating_point():
            raise ValueError(f"VB-LoRA: {n} holds {t.dtype}; expected a floating-point tensor")
        elif not torch.isfinite(t).all():
            raise ValueError(f"VB-LoRA: {n} holds non-finite values (NaN or inf)")
        elif ".vblora_w_" in n and t.numel() and (t.min() < 0 or t.max() > 1 or  # a row's sum, rounding aside:
                                                  t.float().sum(-1).max() > 1 + 1e-5):
            raise ValueError(f"VB-LoRA: {n} holds weights outside [0, 1] or rows that sum above 1")
    if any(l.merged for _, l in _layers(model)):
        raise ValueError("VB-LoRA: a layer is merged; unmerge() before loading")
    bank.vectors.copy_(sd[key])
    for n, l in _layers(model):
        for s in ("A", "B"):
            logits = getattr(l, "vblora_logits_" + s)
            if not compact:
                logits.copy_(sd[f"{n}.vblora_logits_{s}"])
                continue
            idx = sd[f"{n}.vblora_idx_{s}"].to(device=logits.device, dtype=torch.long)  # (..., k)
            w = sd[f"{n}.vblora_w_{s}"].to(logits)  # (..., k-1)
            w = torch.cat([w, (1 - w.sum(-1, keepdim=True)).clamp_min(0)], dim=-1)  # (..., k): sums to 1
            fi = torch.finfo(logits.dtype)
            logits.fill_(fi.min).scatter_(-1, idx, w.clamp_min(fi.tiny).log())  # top-k = idx, softmax = w


def from_authors_state_dict(sd):
    """A checkpoint of the authors' own code (github.com/leo-yangli/VB-LoRA, NLU) -> our full form.

    Their logits_A is (in/b, r, h), ours (r, in/b, h): permute(1, 0, 2). Their logits_B (out/b, r, h) and
    maths (top-k softmax, no scale) are ours. Else only names differ: `<m>.logits_A/B` -> `<m>.vblora_logits_A/B`
    (module paths kept; rename them if your model's differ), and their bank, `vector_bank` at the root and,
    as the same tensor, in every adapted module -> `vblora_bank.vectors`. Base weights and heads are left
    out. PEFT's checkpoints need no conversion."""
    banks = [t for n, t in sd.items() if n.rpartition(".")[2] == "vector_bank"]
    if not banks or any(not torch.equal(t, banks[0]) for t in banks[1:]):
        raise ValueError(f"VB-LoRA: expected one vector_bank (repeated per module), got {len(banks)} unequal")
    out = {"vblora_bank.vectors": banks[0]}
    for n, t in sd.items():
        module, _, leaf = n.rpartition(".")
        if leaf in ("logits_A", "logits_B"):  # (in/b, r, h) -> (r, in/b, h); B stays (out/b, r, h)
            out[f"{module}.vblora_{leaf}"] = t.permute(1, 0, 2).contiguous() if leaf == "logits_A" else t
    return out


def vector_usage(model, weighted=False):
    """(h,) how many sub-vectors select each bank vector (the paper's Fig. 8 histogram); with
    weighted=True, the sum of their top-k weights instead (Figs. 6-7)."""
    bank = _find_bank(model)[1]
    h = bank.cfg.h
    usage = torch.zeros(h, device=bank.vectors.device)
    with torch.no_grad():
        for _, l in _layers(model):
            for logits in (l.vblora_logits_A, l.vblora_logits_B):
                top, idx = logits.reshape(-1, h).topk(l.k, dim=-1)  # (S, k)
                w = top.softmax(dim=-1).float() if weighted else torch.ones_like(top, dtype=torch.float)
                usage.index_add_(0, idx.reshape(-1), w.reshape(-1))
    return usage if weighted else usage.long()
