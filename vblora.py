"""VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks (Li, Han, Ji, NeurIPS 2024;
papers/vblora.txt).

LoRA's ΔW = B A is rebuilt from one vector bank {α_1..α_h} ⊂ R^b shared by every adapted layer.
Each row of A (length in) and each column of B (length out) is cut into sub-vectors of length b,
and every sub-vector is a top-k admixture of bank vectors with its own logits σ ∈ R^h (Eq. 3.3):

    u = Σ_{s ∈ topk(σ)} softmax(σ_topk)_s · α_s          y = base(x) + (x A^T) B^T   (no scale)

Per layer: vblora_logits_A (r, in/b, h) and vblora_logits_B (out/b, r, h), init N(0, 0.01); the bank
(h, b) is init U(−0.02, 0.02) (Table 7). Composed A = u_A.reshape(r, in); B = u_B (out/b, r, b) →
transpose(1, 2) → reshape(out, r), the layout of the authors' code and of Hugging Face PEFT, so
logits trained there load here. Paper defaults: r=4, b=256, k=2, h=256 (GPT-2 Medium) or 90
(RoBERTa); AdamW lr 1e-3 for the bank and 1e-2 for the logits, no weight decay on either.

Choices where the paper is silent:
- Hard top-k without noise, identical in train and eval (Sec. 3.2, Table 5). topk ties go to
  whichever index torch.topk returns.
- All layers' A and B are composed in ONE batched op per step: the bank keeps its layers in a plain
  list (apply order) and the first layer that needs A/B calls bank.compose_all(), which stacks every
  logit row (S_total, h), composes once, splits per layer and caches the result. A layer reuses the
  cache while the bank and its own logits are the same tensors (identity, data_ptr, device, dtype,
  requires_grad) with unchanged `_version` (an optimizer step bumps it) and the grad mode is the same.
  In grad mode a hook on the composed tensor drops the cache once backward has passed through it,
  so the next forward (gradient accumulation) recomposes instead of reusing a freed graph. Hence
  forwards that share one composition must be backpropagated together (sum the losses) or with
  retain_graph=True. Every optimizer step also clears the cache (a global post-step hook: fused AdamW
  writes parameters without bumping `_version`); edits through `p.data` do not bump it either, so call
  bank.clear_cache() after them (load_state_dict and in-place ops under no_grad do bump it).
- The composition runs outside autocast, so the cached A, B keep the bank's dtype whichever autocast
  state the next forward has.
- The layer keeps the bank as a plain reference, not a submodule: the model holds it once, as
  `model.vblora_bank` (state-dict key `vblora_bank.vectors`). The bank's forward is the identity,
  because registering it on an nn.Sequential appends it as a last stage.
- Stored size (Sec. 3.4) counts float32 equivalents: the bank, k−1 weights per sub-vector (the last
  is 1 − Σ) and k indices per sub-vector at 1, 2 or 4 bytes (uint8 if h ≤ 256, uint16 if
  h ≤ 65536, else int32). vblora_state_dict(model) ships exactly that (compact=True) or the full
  logits for resuming training (compact=False). Loading the compact form writes logits log(w) at the
  stored indices and −inf elsewhere (TopK's own −inf, Eq. 3.3), which reproduces the selection and,
  up to float rounding of softmax(log w), the weights; such logits are for inference and can never
  select new vectors, so resume training from the full form.
- With kernels.py importable the layer runs as kernels.lowrank_linear (base + adapter in one op):
  Triton on CUDA, else PyTorch ops with CPU-friendly layouts. The plain formula after it is what runs
  in a copy of this file without kernels.py.
- delta_weight() is in the bank's dtype. No auto-merge on eval(): merge()/unmerge() are explicit;
  while merged, forward = base(x).
"""
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

try:
    import kernels as _kernels
except ImportError:
    _kernels = None


@dataclass
class VBLoRAConfig:
    r: int = 4  # LoRA rank of the composed A, B (paper: 4 everywhere but Llama2-13B)
    b: int = 256  # sub-vector length; must divide every adapted in/out size (Table 6: 256 is best)
    h: int = 256  # bank size: 256 for GPT-2 Medium, 90 for RoBERTa, 2048 for 7B models
    k: int = 2  # vectors mixed per sub-vector; k=2 beats k=1 and costs one weight per sub-vector (Table 5)
    init_logits_std: float = 0.01  # N(0, 0.01) (Table 7): near-uniform start, so top-k can still move
    init_bank_bound: float = 0.02  # U(-0.02, 0.02) (Table 7): ΔW starts small but non-zero

    def __post_init__(self):
        for name in ("r", "b", "h", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"VB-LoRA: {name}={getattr(self, name)} must be >= 1")
        if self.k > self.h:
            raise ValueError(f"VB-LoRA: k={self.k} must be <= h={self.h}")


def vblora_compose_reference(logits, bank, k):
    """(S, h) logits, (h, b) bank -> (S, b): softmax over each row's top-k logits, mix those bank rows."""
    top, idx = logits.topk(k, dim=-1)  # (S, k)
    w = top.softmax(dim=-1)  # (S, k)
    return torch.einsum("sk,skb->sb", w, bank[idx])  # bank[idx]: (S, k, b) -> (S, b)


def _stamp(t):
    # what must not change for a composition made from t to stay valid (.data swaps keep _version)
    return (t._version, t.data_ptr(), t.device, t.dtype, t.requires_grad)


class VBLoRABank(nn.Module):
    """The shared vector bank (h, b), its layers in a fixed order, and their cached A, B."""

    def __init__(self, cfg: VBLoRAConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.vectors = nn.Parameter(torch.empty(cfg.h, cfg.b, device=device, dtype=dtype))
        nn.init.uniform_(self.vectors, -cfg.init_bank_bound, cfg.init_bank_bound)
        self.layers = []  # plain list, not a ModuleList: the model owns the layers
        self.adapted_names = []  # qualified names, filled by apply_vblora
        # (vectors, stamp, grad mode, {layer: (logits_A, stamp, logits_B, stamp, A, B)}, token)
        self._cache = None

    def __getstate__(self):
        # a cached composition may be a non-leaf tensor, which deepcopy/pickle refuse
        state = self.__dict__.copy()
        state["_cache"] = None
        state.pop("_step_hook", None)  # a copy relies on `_version` alone (see clear_cache)
        return state

    def forward(self, x):
        # the bank is a child of the model; in an nn.Sequential that makes it a stage, which passes through
        return x

    def register(self, layer):
        self.layers.append(layer)
        self.clear_cache()

    def clear_cache(self):
        """Forget the composition; needed only after edits through `.data`, which skip `_version`."""
        self._cache = None

    def compose_all(self):
        """Compose every registered layer's A and B in one op; cache and return {layer: (A, B)}."""
        cfg, vec = self.cfg, self.vectors
        logits = [t for l in self.layers for t in (l.vblora_logits_A, l.vblora_logits_B)]
        # outside autocast: the cached A, B keep the bank's dtype whatever the next forward's autocast state
        with torch.autocast(vec.device.type, enabled=False):
            flat = torch.cat([t.reshape(-1, cfg.h) for t in logits])  # (S_total, h)
            if _kernels is not None and _kernels.enabled(flat, vec):
                subs = _kernels.vblora_compose(flat, vec, cfg.k)  # (S_total, b)
            else:
                subs = vblora_compose_reference(flat, vec, cfg.k)  # (S_total, b)
        pieces = subs.split([t.numel() // cfg.h for t in logits])
        entries = {}
        for i, l in enumerate(self.layers):
            A = pieces[2 * i].reshape(cfg.r, l.in_features)  # (r, in/b * b) = (r, in)
            B = pieces[2 * i + 1].reshape(-1, cfg.r, cfg.b)  # (out/b, r, b)
            B = B.transpose(1, 2).reshape(l.out_features, cfg.r)  # (out/b, b, r) -> (out, r)
            la, lb = l.vblora_logits_A, l.vblora_logits_B
            entries[l] = (la, _stamp(la), lb, _stamp(lb), A, B)
        token = object()  # names this composition; the hook must not hold the cache (graph cycle)
        if subs.requires_grad:
            ref = weakref.ref(self)

            def _drop(grad):
                bank = ref()
                if bank is not None and bank._cache is not None and bank._cache[4] is token:
                    bank._cache = None

            subs.register_hook(_drop)
        self._cache = (vec, _stamp(vec), torch.is_grad_enabled(), entries, token)
        return {l: e[4:] for l, e in entries.items()}

    def matrices(self, layer):
        """(A (r, in), B (out, r)) of one layer, from the cache when it is still valid."""
        c = self._cache
        if c is not None and c[0] is self.vectors and c[1] == _stamp(self.vectors) \
                and c[2] == torch.is_grad_enabled() and layer in c[3]:
            la, sa, lb, sb, A, B = c[3][layer]
            if la is layer.vblora_logits_A and lb is layer.vblora_logits_B \
                    and sa == _stamp(la) and sb == _stamp(lb):
                return A, B
        return self.compose_all()[layer]


class VBLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, cfg: VBLoRAConfig, bank: VBLoRABank):
        super().__init__()
        d_in, d_out = base.in_features, base.out_features
        if d_in % cfg.b:
            raise ValueError(f"VB-LoRA: b={cfg.b} must divide in_features={d_in}")
        if d_out % cfg.b:
            raise ValueError(f"VB-LoRA: b={cfg.b} must divide out_features={d_out}")
        if tuple(bank.vectors.shape) != (cfg.h, cfg.b) or bank.cfg.k != cfg.k or bank.cfg.r != cfg.r:
            raise ValueError(f"VB-LoRA: bank (h, b)={tuple(bank.vectors.shape)}, k={bank.cfg.k}, "
                             f"r={bank.cfg.r} do not match config h={cfg.h}, b={cfg.b}, k={cfg.k}, r={cfg.r}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = d_in, d_out
        self.r, self.b, self.k = cfg.r, cfg.b, cfg.k
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.vblora_logits_A = nn.Parameter(torch.empty(cfg.r, d_in // cfg.b, cfg.h, **kw))
        self.vblora_logits_B = nn.Parameter(torch.empty(d_out // cfg.b, cfg.r, cfg.h, **kw))
        nn.init.normal_(self.vblora_logits_A, std=cfg.init_logits_std)
        nn.init.normal_(self.vblora_logits_B, std=cfg.init_logits_std)
        object.__setattr__(self, "bank", bank)  # plain reference: the model, not each layer, owns it
        bank.register(self)
        self.merged = False

    def forward(self, x):
        if self.merged:
            return self.base(x)
        A, B = self.bank.matrices(self)
        if _kernels is not None:  # base and adapter as one op: Triton on GPU, else CPU-friendly PyTorch
            return _kernels.lowrank_linear(x, self.base.weight, self.base.bias, A, B, None, 1.0)
        return self.base(x) + (x @ A.t()) @ B.t()  # (..., in) -> (..., r) -> (..., out)

    def delta_weight(self):
        A, B = self.bank.matrices(self)
        return B @ A  # (out, r) @ (r, in) -> (out, in)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            W = self.base.weight  # W + ΔW in fp32 at least, rounded once to W's dtype
            W.copy_(W.to(torch.promote_types(W.dtype, torch.float32)) + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            W = self.base.weight
            W.copy_(W.to(torch.promote_types(W.dtype, torch.float32)) - self.delta_weight())
            self.merged = False

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, b={self.b}, k={self.k}"


def vblora_param_count(d_in, d_out, cfg):
    """Trainable logits of one layer. The bank (h·b) is shared and counted once per model."""
    return cfg.r * (d_in // cfg.b) * cfg.h + (d_out // cfg.b) * cfg.r * cfg.h


def _index_dtype(h):
    return torch.uint8 if h <= 256 else torch.uint16 if h <= 65536 else torch.int32


def vblora_stored_param_count(model):
    """Float32 equivalents shipped (Sec. 3.4): h·b + S·(k−1) + S·k·bytes(index)/4, S = sub-vectors.

    For k=2 and uint8 indices this is the paper's h·b + 3·L·M·r·(d/b)."""
    bank = _find_bank(model)
    h, b, k = bank.cfg.h, bank.cfg.b, bank.cfg.k
    S = sum((l.vblora_logits_A.numel() + l.vblora_logits_B.numel()) // h for _, l in _layers(model))
    quarters = 4 * (h * b + S * (k - 1)) + S * k * _index_dtype(h).itemsize  # an index byte = 1/4 float
    return quarters // 4 if quarters % 4 == 0 else quarters / 4


def apply_vblora(model, cfg, targets):
    """Swap the targeted nn.Linears for VBLoRALinear around one new shared bank; return the bank."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("VB-LoRA: targets is empty; name at least one nn.Linear")
    if hasattr(model, "vblora_bank"):
        raise ValueError("VB-LoRA: model already has a vblora_bank; apply_vblora once per model")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linears):
            raise ValueError(f"VB-LoRA: target {t!r} matches no nn.Linear; "
                             f"Linear names include {list(linears)[:6]}")
    names = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    w = linears[names[0]].weight
    bank = VBLoRABank(cfg, device=w.device, dtype=w.dtype)
    layers = [VBLoRALinear(linears[n], cfg, bank) for n in names]  # shape errors before any swap
    model.requires_grad_(False)  # the bank and layers are attached after, so they stay trainable
    model.vblora_bank = bank
    for n, layer in zip(names, layers):
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    bank.adapted_names = names
    ref = weakref.ref(bank)  # the hook must not keep a deleted model's bank alive
    bank._step_hook = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: ref() is not None and ref().clear_cache())
    return bank


def _find_bank(model):
    banks = [m for m in model.modules() if isinstance(m, VBLoRABank)]
    if len(banks) != 1:
        raise ValueError(f"VB-LoRA: expected one VBLoRABank in the model, found {len(banks)}")
    return banks[0]


def _layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, VBLoRALinear)]


def _bank_key(model):
    bank = _find_bank(model)
    return next(n for n, p in model.named_parameters() if p is bank.vectors), bank


def vblora_state_dict(model, compact=True):
    """Adapter tensors only. compact=True: bank + top-k indices + first k−1 weights per sub-vector
    (what the paper ships); compact=False: bank + full logits (to resume training)."""
    key, bank = _bank_key(model)
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
    """Load either form of vblora_state_dict (told apart by its keys) into an adapted model."""
    key, bank = _bank_key(model)
    compact = any(k.endswith(".vblora_idx_A") for k in sd)
    shapes = {key: bank.vectors.shape}
    for n, l in _layers(model):
        for side in ("A", "B"):
            shape = getattr(l, "vblora_logits_" + side).shape  # (..., h)
            if compact:
                shapes[f"{n}.vblora_idx_{side}"] = shape[:-1] + (l.k,)
                shapes[f"{n}.vblora_w_{side}"] = shape[:-1] + (l.k - 1,)
            else:
                shapes[f"{n}.vblora_logits_{side}"] = shape
    if set(sd) != set(shapes):
        missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
        raise ValueError(f"VB-LoRA: state dict keys differ; missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for name, shape in shapes.items():
        if sd[name].shape != shape:
            raise ValueError(f"VB-LoRA: {name} has shape {tuple(sd[name].shape)}, "
                             f"model expects {tuple(shape)}")
    bank.vectors.copy_(sd[key])
    for n, l in _layers(model):
        for side in ("A", "B"):
            logits = getattr(l, "vblora_logits_" + side)
            if not compact:
                logits.copy_(sd[f"{n}.vblora_logits_{side}"])
                continue
            idx = sd[f"{n}.vblora_idx_{side}"].to(device=logits.device, dtype=torch.long)  # (..., k)
            w = sd[f"{n}.vblora_w_{side}"].to(logits)  # (..., k-1)
            last = (1 - w.sum(-1, keepdim=True)).clamp_min(0)  # (..., 1): weights sum to 1
            w = torch.cat([w, last], dim=-1)  # (..., k)
            logits.fill_(float("-inf")).scatter_(-1, idx, w.log())  # top-k = idx, softmax(log w) = w


def vector_usage(model, weighted=False):
    """(h,) how many sub-vectors select each bank vector (the paper's Fig. 8 histogram); with
    weighted=True, the sum of their top-k weights instead (Figs. 6-7)."""
    bank = _find_bank(model)
    h = bank.cfg.h
    usage = torch.zeros(h, device=bank.vectors.device)
    with torch.no_grad():
        for _, l in _layers(model):
            for logits in (l.vblora_logits_A, l.vblora_logits_B):
                top, idx = logits.reshape(-1, h).topk(l.k, dim=-1)  # (S, k)
                w = top.softmax(dim=-1).float() if weighted else torch.ones_like(top, dtype=torch.float)
                usage.index_add_(0, idx.reshape(-1), w.reshape(-1))
    return usage if weighted else usage.long()
