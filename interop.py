"""Adapter files other tools read: Hugging Face PEFT's folder format, in and out, and a plain-LoRA export
that any LoRA-only server (vLLM, PEFT itself) loads.

A PEFT folder holds two files:
    adapter_config.json         {"peft_type": "LORA" | "VBLORA" | "MISS", "r": ..., "target_modules": [...], ...}
    adapter_model.safetensors   "base_model.model.<module>.<tensor>" -> tensor (no adapter name in the key)

save_peft writes LoRA, VB-LoRA and Bone-col in PEFT 0.21's own types (LORA, VBLORA, MISS); save_lora writes any
layer's ΔW (SeRA, SiVA, Bone-row, a forker's method: any layer with a .base and a delta_weight()) as plain LoRA.
Each type's fields and tensors, what load_peft honours and refuses, and how it is tested: docs/load-peft.md.

layout: our module names -> the target model's. layout(our_name) -> (their_name, part, n_parts, fan_in_fan_out):
this Linear is rows [part*out, (part+1)*out) of their module, which fuses n_parts equal parts (Hugging Face GPT-2's
Conv1D c_attn holds q, k, v); fan_in_fan_out marks a Conv1D, weight (in, out). LoRA tensors do not depend on it;
MiSS takes only nn.Linear. None means identity_layout. Fused LoRA: parts p with (A_p, B_p) become one module of rank
R = Σ r_p, A = [A_p; ...] (R, in), B (n_parts*out, R) with B_p in rows of part p and its own columns, zero
elsewhere; one scale per module. load_peft splits B by rows, drops the columns a part leaves zero and skips parts
whose B is zero: both exact.
"""
import json
import math
import os
import re
from collections import Counter

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import bone
import lora
import sera
import siva
import vblora

PREFIX = "base_model.model."  # PEFT's prefix of every module key
BANK_KEY = "base_model.vblora_vector_bank"  # VB-LoRA's bank: one tensor, outside the modules


def identity_layout(name):
    return name, 0, 1, False


def _adapters(model):
    """Every adapted layer of `model`: nanopeft's, or a forker's method, each with its .base and delta_weight()."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "delta_weight")]


def _write(path, peft_type, cfg, tensors, modules_to_save, base_model_name_or_path):
    tensors.update({f"{PREFIX}{module}.{p}": t for module, params in (modules_to_save or {}).items()
                    for p, t in params.items()})  # PEFT's form of modules_to_save: each module's own state dict
    cfg = {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": base_model_name_or_path,
           "inference_mode": True, "modules_to_save": sorted(modules_to_save) if modules_to_save else None, **cfg}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {k: t.detach().cpu().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


def _lora_folder(path, factors, where, dropout, modules_to_save, base_model_name_or_path):
    """Write {our name: (A (r, in), B (out, r), scale)} as one PEFT LoRA folder, fusing the parts of a module."""
    groups = {}
    for ours, (A, B, s) in factors.items():
        their, part, n, fifo = where(ours)
        groups.setdefault(their, []).append((part, n, fifo, A, B, s))
    tensors, rank, alpha = {}, {}, {}
    for their, parts in groups.items():
        parts.sort(key=lambda p: p[0])
        _, n, fifo, _, B0, s = parts[0]
        out = B0.shape[0]
        if len({(p[1], p[2], p[4].shape[0]) for p in parts}) > 1 or len({p[0] for p in parts}) < len(parts):
            raise ValueError(f"save: the layout gives parts of {their!r} unequal n_parts, fan_in_fan_out or "
                             "sizes, or one part twice")
        # parts that hold the same A (as load_peft makes them from one fused PEFT LoRA) share its rows, so a
        # re-export keeps the rank it was imported with
        As, cols = [], []  # the distinct A_p; each part's first column in B
        for a in (p[3] for p in parts):
            i = next((i for i, x in enumerate(As) if x.shape == a.shape and torch.equal(x, a)), len(As))
            As += [a] if i == len(As) else []
            cols.append(sum(x.shape[0] for x in As[:i]))
        A = torch.cat(As)  # (R, in), R = Σ r_p over distinct A_p
        B = A.new_zeros(n * out, A.shape[0])  # (n*out, R): absent parts keep zero rows
        for (p, _, _, a, b, sp), col in zip(parts, cols):
            B[p * out:(p + 1) * out, col:col + a.shape[0]] = b * (sp / s)  # one scale s per module: fold the ratio
        tensors[f"{PREFIX}{their}.lora_A.weight"], tensors[f"{PREFIX}{their}.lora_B.weight"] = A, B
        rank[their], alpha[their] = A.shape[0], s * A.shape[0]  # scale = lora_alpha / R = s
        alpha[their] = int(alpha[their]) if float(alpha[their]).is_integer() else alpha[their]
    first = next(iter(groups))
    cfg = {"r": rank[first], "lora_alpha": alpha[first], "lora_dropout": dropout, "use_rslora": False,
           "fan_in_fan_out": any(where(n)[3] for n in factors), "bias": "none", "target_modules": sorted(groups),
           "rank_pattern": {re.escape(t): r for t, r in rank.items() if r != rank[first]},
           "alpha_pattern": {re.escape(t): a for t, a in alpha.items() if a != alpha[first]}}
    _write(path, "LORA", cfg, tensors, modules_to_save, base_model_name_or_path)


def why_not_peft(model, layout=None):
    """Why `model`'s adapters have no exact PEFT form under `layout` (one line, naming the way out), or None."""
    where, layers = layout or identity_layout, _adapters(model)
    if not layers:
        return "the model holds no nanopeft adapter"
    kinds = sorted({type(m).__name__.removesuffix("Linear") for _, m in layers})  # LoRALinear -> LoRA
    if len(kinds) > 1:
        return f"a PEFT folder holds one method; the model mixes {kinds}. save_lora writes any mix as one plain LoRA"
    first = layers[0][1]
    for ours, m in layers:
        _, _, n_parts, fifo = where(ours)
        why = None
        if not isinstance(m, (lora.LoRALinear, vblora.VBLoRALinear, bone.BoneLinear)):
            why = "PEFT has no such method"
        elif isinstance(m, vblora.VBLoRALinear) and n_parts > 1:
            why = ("it is one part of a fused module; the other parts would need zero sub-vectors, which a top-k "
                   "mix of bank vectors cannot make")
        elif isinstance(m, bone.BoneLinear) and m.cfg.grouping == "row":
            why = "PEFT's MiSS has no Bone-row (one B per input column-block)"
        elif isinstance(m, bone.BoneLinear) and m.cfg.variant == "hadamard":
            why = "PEFT's MiSS has no 'hadamard' variant"
        elif isinstance(m, bone.BoneLinear) and (n_parts > 1 or fifo):
            why = "PEFT's MiSS takes only nn.Linear targets, not a fused or fan_in_fan_out (Conv1D) module"
        elif isinstance(m, bone.BoneLinear) and (m.cfg.b, m.cfg.variant) != (first.cfg.b, first.cfg.variant):
            why = "a MiSS folder has one r and one init_weights; this layer's b or variant differs from the first's"
        if why:
            return (f"{ours!r} ({kinds[0]}): {why}. save_lora writes any method's ΔW as plain LoRA, which PEFT and "
                    "vLLM load")
    return None


def save_peft(model, path, layout=None, modules_to_save=None, base_model_name_or_path=None):
    """Every nanopeft adapter of `model` (one method: LoRA, VB-LoRA or Bone-col) as a PEFT folder at `path`.
    modules_to_save: {their module name: {param name: tensor}}, written beside the adapter."""
    why = why_not_peft(model, layout)
    if why:
        raise ValueError(f"save_peft: {why}")
    where, layers = layout or identity_layout, _adapters(model)
    m0 = layers[0][1]
    if isinstance(m0, lora.LoRALinear):
        factors = {n: (m.lora_A, m.lora_B, m.scale) for n, m in layers}
        return _lora_folder(path, factors, where, m0.cfg.dropout, modules_to_save, base_model_name_or_path)
    targets = [where(n)[0] for n, _ in layers]
    if isinstance(m0, vblora.VBLoRALinear):
        tensors = {BANK_KEY: m0.bank.vectors}
        for t, (_, m) in zip(targets, layers):
            tensors[f"{PREFIX}{t}.vblora_logits_A"] = m.vblora_logits_A  # (r, in/b, h)
            tensors[f"{PREFIX}{t}.vblora_logits_B"] = m.vblora_logits_B  # (out/b, r, h)
        cfg = {"r": m0.r, "vector_length": m0.b, "num_vectors": m0.bank.cfg.h, "topk": m0.k, "vblora_dropout": 0.0,
               "save_only_topk_weights": False, "fan_in_fan_out": any(where(n)[3] for n, _ in layers)}
        kind = "VBLORA"
    else:  # Bone-col, "bone" or "unconstrained"
        b, bat = m0.cfg.b, m0.cfg.variant == "bone"
        tensors = {f"{PREFIX}{t}.miss_block": m.bone_B if bat else m.bone_B.reshape(-1, b).T  # (out/b,b,b) | (b,out)
                   for t, (_, m) in zip(targets, layers)}
        cfg = {"r": b, "init_weights": "bat" if bat else True, "miss_dropout": 0.0}
        kind = "MISS"
    cfg.update(target_modules=sorted(targets), bias="none")
    _write(path, kind, cfg, tensors, modules_to_save, base_model_name_or_path)


def _factors(m, ct):
    """The method's own (A (R, in), B (out, R)) with ΔW = B A exactly, in dtype ct, or None: Bone's
    ΔW_ij = W_ij B_g + B_g has no low-rank form."""
    if isinstance(m, lora.LoRALinear):
        return m.lora_A.to(ct), m.scale * m.lora_B.to(ct)  # the scale folded into B
    if isinstance(m, sera.SeRALinear):
        A = torch.block_diag(*m.sera_A.to(ct))  # (in, r) = blockdiag(A_1..A_split)
        B = torch.block_diag(*m.sera_B.to(ct))  # (r, out) = blockdiag(B_1..B_split)
        return (A @ m.sera_C.to(ct)).T, m.scale * B.T  # ΔW = scale (A C B)^T = (scale B^T)(A C)^T
    if isinstance(m, siva.SiVALinear):
        return m.siva_V.to(ct), m.siva_U.to(ct) * m.siva_s.to(ct)  # V_k^T (k, in), U_k diag(s) (out, k)
    if isinstance(m, vblora.VBLoRALinear):
        A, B = m.bank.compose([m])[0]  # (r, in), (out, r); no scale
        return A.to(ct), B.to(ct)
    return None


def _lowrank(m, rank):
    """(A (R, in), B (out, R), relative error) with ΔW ≈ B A: the method's own factors where rank allows them
    (error None), else ΔW's SVD truncated to R, the best rank-R approximation (Eckart-Young)."""
    ct = torch.promote_types(m.base.weight.dtype, torch.float32)
    exact = _factors(m, ct)
    if exact is not None and (rank is None or rank >= exact[0].shape[0]):
        return exact[0], exact[1], None
    dW = m.delta_weight().double()  # (out, in)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)  # (out, n), (n,), (n, in)
    # no rank given: Bone takes its block size b; a method without factors here, ΔW's numerical rank
    R = min(rank or (m.cfg.b if isinstance(m, bone.BoneLinear) else int((S > 1e-6 * S[0]).sum()) or 1), len(S))
    err = (S[R:].norm() / S.norm()).item() if S.norm() > 0 else 0.0
    return Vh[:R].to(ct), (U[:, :R] * S[:R]).to(ct), err


@torch.no_grad()
def save_lora(model, path, rank=None, layout=None, modules_to_save=None, base_model_name_or_path=None):
    """Every adapted layer's ΔW, any method, as one plain PEFT LoRA folder (scale 1: lora_alpha = r per module):
    exact where the method factorises within `rank`, else ΔW's SVD truncated (see _lowrank), with one printed line
    of the largest relative Frobenius error. Returns {our name: relative error}, 0.0 where exact."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"save_lora: rank={rank!r} must be None or an int >= 1")
    layers = _adapters(model)
    if not layers:
        raise ValueError("save_lora: the model holds no nanopeft adapter")
    factors, errors, worst = {}, {}, None
    for ours, m in layers:
        A, B, err = _lowrank(m, rank)
        factors[ours], errors[ours] = (A, B, 1.0), err or 0.0
        if err is not None and (worst is None or err > worst[0]):
            worst = (err, ours, A.shape[0])
    _lora_folder(path, factors, layout or identity_layout, 0.0, modules_to_save, base_model_name_or_path)
    if worst:
        err, ours, r = worst
        print(f"save_lora: ΔW truncated to rank {r} by SVD: relative error up to {err:.3g} ({ours})")
    return errors


def _inverse(model, where):
    """Their module name -> {part: (our name, n_parts, fan_in_fan_out)}, over every module of `model`."""
    inv = {}
    for ours, _ in model.named_modules():
        their, part, n, fifo = where(ours)
        if part in inv.setdefault(their, {}):
            raise ValueError(f"layout maps both {inv[their][part][0]!r} and {ours!r} to part {part} of {their!r}")
        inv[their][part] = (ours, n, fifo)
    return inv


# -----------------------------------------------------------------------------
# Reading a PEFT folder: read_peft checks the config and builds the method's config, load_peft the tensors

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_METHODS = {"LORA": "lora", "VBLORA": "vblora", "MISS": "bone"}  # peft_type -> the nanopeft method it loads as
_COMMON = dict(  # every peft_type: where the adapter came from, and which modules it goes on (read by _selected)
    peft_type=None, task_type=None, auto_mapping=None, peft_version=None, base_model_name_or_path=None, revision=None,
    inference_mode=False, target_modules=None, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
    modules_to_save=None, fan_in_fan_out=False, bias="none")
_FIELDS = {  # per peft_type: the fields honoured, at PEFT 0.21's defaults; any other field that is set is refused.
    # Megatron's and QALoRA's settings go unread while their switches are off; VB-LoRA's init_* and MiSS's mini_r
    # only start what the file's tensors replace
    "LORA": dict(r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, rank_pattern={}, alpha_pattern={},
                 init_lora_weights=True, megatron_core="megatron.core", qalora_group_size=16),
    "VBLORA": dict(r=4, num_vectors=256, vector_length=256, topk=2, save_only_topk_weights=False, vblora_dropout=0.0,
                   init_vector_bank_bound=0.02, init_logits_std=0.1),
    "MISS": dict(r=64, init_weights=True, miss_dropout=0.0, mini_r=1),
}


def _is_names(v):
    """A regex, or a list of names, each usable in a regex (PEFT matches modules_to_save and layers_pattern so)."""
    try:
        names = [v] if isinstance(v, str) else v if type(v) is list else [None]
        return all(isinstance(x, str) and re.compile(x) for x in names)
    except re.error:
        return False


_VALUES = {  # field -> (whether nanopeft honours value v, given the config c, as PEFT does; what it expects; the
    # reasons: docs/load-peft.md). The method's numbers (r, lora_alpha, topk ...) are left to the method's *Config
    "target_modules": (lambda v, c: v != "all-linear" and _is_names(v), "the module names or regex PEFT saved"),
    "exclude_modules": (lambda v, c: v is None or _is_names(v), "null, a list of module names or a regex"),
    "layers_to_transform": (
        lambda v, c: v is None or all(type(i) is int and i >= 0 for i in (v if type(v) is list else [v])),
        "null, a layer index or a list of them"),
    "layers_pattern": (lambda v, c: v is None or _is_names(v), "null, a regex or a list of them"),
    "modules_to_save": (lambda v, c: v is None or type(v) is list and _is_names(v), "null or a list of module names"),
    "bias": (lambda v, c: v == "none", "'none' (nanopeft's adapters have no bias)"),
    **dict.fromkeys(("rank_pattern", "alpha_pattern"), (lambda v, c: v is None or isinstance(v, dict) and
                                                        _is_names(list(v)), "an object {module regex: value}")),
    "init_lora_weights": (lambda v, c: v in (True, False, "gaussian"), "true, false or 'gaussian' (the others "
                          "rewrite the base weights)"),
    "vblora_dropout": (lambda v, c: v == 0, "0 (nanopeft's VB-LoRA has no dropout)"),
    "init_weights": (lambda v, c: v in (True, False, "bat"), "true, false or 'bat' (nanopeft's Bone has no 'mini')"),
    "miss_dropout": (lambda v, c: v == 0 or c["init_weights"] == "bat", "0 (nanopeft's Bone has no dropout)"),
}


def _fields(cfg):
    """`cfg` with PEFT 0.21's defaults filled in; a field set that nanopeft does not honour, or a value it cannot
    honour as PEFT does, is one ValueError naming it."""
    if not isinstance(cfg, dict):
        raise ValueError(f"not a JSON object (it holds a JSON {type(cfg).__name__}); expected PEFT's config")
    kind = cfg.get("peft_type")
    if kind not in _FIELDS:
        raise ValueError(f"peft_type {kind!r} has no nanopeft form; {sorted(_FIELDS)} load")
    known = _COMMON | _FIELDS[kind]
    c = known | cfg
    unknown = sorted(k for k, v in cfg.items() if k not in known and v not in (None, False, {}, [], ""))
    if unknown:  # use_dora, lora_bias, layer_replication ... change the maths; a newer PEFT's field, no one knows
        raise ValueError(f"{unknown}: not fields nanopeft honours in PEFT 0.21's {kind}; expected them absent or unset")
    for k, (ok, expected) in _VALUES.items():
        if k in c and not ok(c[k], c):
            raise ValueError(f"{k}={c[k]!r}: expected {expected}")
    return c


def _config(cls, **fields):
    """cls(**{ours: value}) from fields {ours: (PEFT's field, value)}; a value it refuses is named by PEFT's field
    (each config names the value it refuses first: "LoRA: alpha='8' must be ...")."""
    try:
        return cls(**{k: v for k, (_, v) in fields.items()})
    except ValueError as e:
        m = re.match(r"[\w-]+: (\w+)=", str(e))
        raise ValueError(f"{fields[m[1]][0] if m and m[1] in fields else list(fields)}: {e}")


def _pattern(cfg, name, their, field):
    """(PEFT's field, value) for module `their`: the value of the first key of cfg[name] (rank_pattern,
    alpha_pattern) that matches it, as PEFT's get_pattern_key takes it, else cfg[field]."""
    for k, v in (cfg[name] or {}).items():
        if re.match(rf"(.*\.)?({k})$", their):
            return f"{name} {k!r}", v
    return field, cfg[field]


def _method_config(c, sd):
    """The method's config from the fields `c`: VB-LoRA's or Bone's; LoRA's, one per module that the tensors `sd`
    are for and PEFT selects, with that module's r and alpha."""
    if c["peft_type"] == "VBLORA":
        return _config(vblora.VBLoRAConfig, r=("r", c["r"]), b=("vector_length", c["vector_length"]),
                       h=("num_vectors", c["num_vectors"]), k=("topk", c["topk"]))
    if c["peft_type"] == "MISS":
        return _config(bone.BoneConfig, b=("r", c["r"]),
                       variant=("init_weights", "bone" if c["init_weights"] == "bat" else "unconstrained"))
    found = sorted({k[len(PREFIX):-len(".lora_A.weight")] for k in sd if k.startswith(PREFIX)
                    and k.endswith(".lora_A.weight")})
    return {their: _config(lora.LoRAConfig, r=_pattern(c, "rank_pattern", their, "r"),
                           alpha=_pattern(c, "alpha_pattern", their, "lora_alpha"),
                           dropout=("lora_dropout", c["lora_dropout"])) for their in found if _selected(c, their)}


def _listed(names, their):
    return their in names or any(their.endswith("." + n) for n in names)


def _selected(cfg, their):
    """Whether PEFT 0.21 puts the adapter on module `their` (its check_target_module_exists, field for field)."""
    ex = cfg.get("exclude_modules")
    if ex and (re.fullmatch(ex, their) if isinstance(ex, str) else _listed(ex, their)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", their) for m in cfg.get("modules_to_save") or []):
        return False  # a module trained whole takes no adapter
    t = cfg["target_modules"]
    if isinstance(t, str):
        return bool(re.fullmatch(t, their))
    if their in t:
        return True  # named in full: layers_to_transform does not apply
    if not _listed(t, their):
        return False
    layers, pats = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if layers is None or layers == []:
        return True
    if not pats:  # the first numbered segment is the layer index
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", their)
    else:
        m = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", their)
                               for p in ([pats] if isinstance(pats, str) else pats))), None)
    return m is not None and (int(m["idx"]) == layers if isinstance(layers, int) else int(m["idx"]) in layers)


def _select(model, cfg, sd, inv, suffixes, extra=()):
    """The modules with tensors in `sd` that PEFT adapts. Other keys: `extra`, and other modules' tensors, left unread
    as PEFT leaves them; a selected nn.Linear without tensors is refused (PEFT would start it from its init)."""
    found = {k[len(PREFIX):-len(s)] for k in sd for s in suffixes if k.startswith(PREFIX) and k.endswith(s)}
    chosen = sorted(their for their in found if _selected(cfg, their))
    idle = sorted(their for their, parts in inv.items() if their not in found and _selected(cfg, their) and
                  all(isinstance(model.get_submodule(o), nn.Linear) for o, _, _ in parts.values()))
    if idle or not chosen:
        raise ValueError(f"holds no tensors for {idle[:4] or 'any module'} that target_modules selects in the model")
    expected = {*extra, *(f"{PREFIX}{their}{s}" for their in chosen for s in suffixes)}
    missing = sorted(expected - sd.keys())
    unexpected = sorted(k for k in sd.keys() - expected if not (k.startswith(PREFIX) and k.endswith(suffixes)))
    if missing or unexpected:
        raise ValueError(f"keys differ from what the model needs: missing {missing[:4]}, unexpected {unexpected[:4]}")
    targets = []  # (their module, our parts {part: (our name, n_parts, fan_in_fan_out)}, n_parts)
    for their in chosen:
        parts = inv.get(their)
        lins = [model.get_submodule(o) for o, _, _ in (parts or {}).values()]
        if not lins or not all(isinstance(l, nn.Linear) for l in lins) or len({l.weight.shape for l in lins}) > 1:
            raise ValueError(f"the adapter targets {their!r}, which maps to no nn.Linear (or unequal ones) of the "
                             "model; check the layout")
        targets.append((their, parts, next(iter(parts.values()))[1]))
    return targets


def _load_lora(model, cfg, configs, sd, inv):
    groups, ours_sd = {}, {}
    for their, parts, n in _select(model, cfg, sd, inv, (".lora_A.weight", ".lora_B.weight")):
        c = configs[their]  # this module's r and alpha (rank_pattern, alpha_pattern)
        s = c.alpha / math.sqrt(c.r) if cfg["use_rslora"] else c.alpha / c.r
        A, B = sd[f"{PREFIX}{their}.lora_A.weight"], sd[f"{PREFIX}{their}.lora_B.weight"]  # (r, in), (n*out, r)
        if n > 1 and A.shape[:1] != (c.r,):  # a whole module: lora.load_lora_state_dict checks r
            raise ValueError(f"{PREFIX}{their}.lora_A.weight has shape {tuple(A.shape)}; r={c.r}")
        for p in range(n):
            Bp = B.unflatten(0, (n, -1))[p]  # (out, r): this part's rows
            keep = Bp.ne(0).any(0) if n > 1 else slice(None)  # (r,): the columns it uses
            if n > 1 and not keep.any():
                continue  # ΔW_p = 0: leaving the part plain is exact
            if p not in parts:
                raise ValueError(f"part {p} of {their!r} has a non-zero B and maps to no module")
            ours, rp = parts[p][0], c.r if n == 1 else int(keep.sum())
            groups.setdefault((rp, s * rp), []).append(ours)  # our alpha / r = PEFT's scale
            ours_sd[f"{ours}.lora_A"], ours_sd[f"{ours}.lora_B"] = A[keep], Bp[:, keep]  # (rp, in), (out, rp)
    for (r, alpha), names in groups.items():
        lora.apply_lora(model, lora.LoRAConfig(r=r, alpha=alpha, dropout=cfg["lora_dropout"]), names)
    lora.load_lora_state_dict(model, ours_sd)


def _load_vblora(model, cfg, c, sd, inv):
    leaves = {"_topk_indices": "idx", "_topk_weights": "w"} if cfg["save_only_topk_weights"] else {"": "logits"}
    suffixes = [f".vblora_logits_{s}{leaf}" for s in "AB" for leaf in leaves]
    ours_sd, names = {"vblora_bank.vectors": sd.get(BANK_KEY)}, []
    for their, parts, n in _select(model, cfg, sd, inv, suffixes, extra=[BANK_KEY]):
        if len(parts) < n:
            raise ValueError(f"VB-LoRA on {their!r} needs every one of its {n} parts in the model")
        for p, (ours, _, _) in sorted(parts.items()):
            names.append(ours)
            for leaf, short in leaves.items():
                ours_sd[f"{ours}.vblora_{short}_A"] = sd[f"{PREFIX}{their}.vblora_logits_A{leaf}"]  # A is shared
                B = sd[f"{PREFIX}{their}.vblora_logits_B{leaf}"]  # (n*out/b, r, .)
                ours_sd[f"{ours}.vblora_{short}_B"] = B.unflatten(0, (n, -1))[p]  # (out/b, r, .): part p's rows
    vblora.apply_vblora(model, c, names)
    vblora.load_vblora_state_dict(model, ours_sd)


def _load_miss(model, cfg, c, sd, inv):
    blocks = {}
    for their, parts, n in _select(model, cfg, sd, inv, (".miss_block",)):
        (ours, _, fifo), *more = parts.values()
        if more or n > 1 or fifo:
            raise ValueError(f"MiSS on {their!r}: MiSS takes only a whole nn.Linear, not a fused or fan_in_fan_out "
                             "module")
        blocks[ours] = sd[f"{PREFIX}{their}.miss_block"]
    bone.apply_bone(model, c, list(blocks))  # where r does not divide a width, MiSS pads x; Bone refuses
    # bat: miss_block is bone_B; else M (r, out) -> (r, out/r, r) -> (out/r, r, r): B_i = M[:, i-th block]^T
    bat = c.variant == "bone"
    bone.load_bone_state_dict(model, {f"{ours}.bone_B": M if bat else M.unflatten(1, (-1, c.b)).permute(1, 2, 0)
                                      for ours, M in blocks.items()})


def is_folder(path):
    """Whether `path` is a PEFT folder: a folder holding adapter_config.json or adapter_model.safetensors."""
    return os.path.isdir(str(path)) and any(os.path.exists(os.path.join(str(path), f)) for f in (CONFIG, WEIGHTS))


def read_peft(path):
    """The PEFT folder at `path` read and checked (check_peft), or None where `path` is no PEFT folder; a fault is
    one ValueError line naming the file and the field."""
    conf, file = (os.path.join(str(path), f) for f in (CONFIG, WEIGHTS))
    if not is_folder(path):
        return None
    if not os.path.isfile(conf):
        raise ValueError(f"{path} holds {WEIGHTS} but no {CONFIG}; a PEFT folder needs both")
    try:
        with open(conf, encoding="utf-8") as f:
            cfg = json.load(f)
    except ValueError as e:  # not JSON, not UTF-8
        raise ValueError(f"load_peft: {conf}: not a JSON object ({e}); expected PEFT's config")
    if not os.path.isfile(file) or os.path.getsize(file) == 0:
        raise ValueError(f"load_peft: {file}: {'an empty file' if os.path.isfile(file) else 'no such file'}; "
                         "expected the adapter's tensors (safetensors)")
    try:
        sd = load_file(file)  # safetensors checks every offset against the file's size before it reads
    except Exception as e:
        raise ValueError(f"load_peft: {file}: not a readable safetensors file (truncated, or a header that does "
                         f"not fit its data): {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
    return check_peft(cfg, sd, path)


def check_peft(config, tensors, where="the PEFT folder"):
    """A PEFT folder's config, checked, and tensors, from the folder `where` -> {"config": as read, "tensors",
    "fields": every field, PEFT 0.21's default where absent, "method": the method's config (LoRA's: per module)}."""
    try:
        fields = _fields(config)
        return dict(config=config, tensors=tensors, fields=fields, method=_method_config(fields, tensors))
    except ValueError as e:  # one place names the file
        raise ValueError(f"load_peft: {os.path.join(str(where), CONFIG)}: {e}") from None


def _saved_modules(model, cfg, sd, inv):
    """Pop the modules_to_save tensors from sd, each as (our module, parameter name, tensor)."""
    entries, own, out = cfg.get("modules_to_save") or [], model.state_dict(), []
    for key in [k for k in sd if k.startswith(PREFIX)]:
        parts = key[len(PREFIX):].split(".")
        for i in range(1, len(parts)):  # PEFT names a wrapped module by a suffix of its name
            their, param = ".".join(parts[:i]), ".".join(parts[i:])
            if _listed(entries, their):
                break
        else:
            continue
        mapped = list(inv.get(their, {}).values())
        ours, n, fifo = mapped[0] if len(mapped) == 1 else (None, 0, False)
        target = own.get(f"{ours}.{param}") if n == 1 else None  # a whole module, not a part of a fused one
        t = sd.pop(key)
        t = t.T if fifo and param == "weight" else t  # a Conv1D weight is (in, out)
        if target is None or t.shape != target.shape or not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"modules_to_save {key} ({tuple(t.shape)}, {t.dtype}) fits no tensor of the model, or "
                             "holds non-finite values; check the layout")
        module, _, name = f"{ours}.{param}".rpartition(".")
        out.append((model.get_submodule(module), name, t))
    return out


def load_peft(model, path, layout=None, peft=None):
    """Apply the PEFT folder at `path` (LORA, VBLORA or MISS; `peft`: that folder, already read by read_peft) to the
    plain `model` as the matching nanopeft method, its modules_to_save into the model's own; -> the adapted names
    (ours). Each field is honoured as PEFT 0.21 honours it or refused by name; a refusal leaves the model as it was."""
    peft = peft or read_peft(path)
    if peft is None:
        raise ValueError(f"load_peft: {path}: no {CONFIG} there; a PEFT folder holds {CONFIG} and {WEIGHTS}")
    cfg = peft["fields"]
    if _adapters(model):
        raise ValueError("load_peft: the model already holds nanopeft adapters; load into a plain model")
    sd, inv = dict(peft["tensors"]), _inverse(model, layout or identity_layout)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        saved = _saved_modules(model, cfg, sd, inv)
        load = {"LORA": _load_lora, "VBLORA": _load_vblora, "MISS": _load_miss}[cfg["peft_type"]]
        load(model, cfg, peft["method"], sd, inv)
    except (ValueError, RuntimeError, IndexError) as e:  # put the model back: each new layer gives back its base
        for name, m in _adapters(model):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, m.base)
        if hasattr(model, "vblora_bank"):
            for hook in model.vblora_bank.hooks:
                hook.remove()
            del model.vblora_bank
        for p, g in grads:
            p.requires_grad_(g)
        raise ValueError(f"load_peft: {os.path.join(str(path), WEIGHTS)}: {e}") from e  # one place names the file
    for _, m in _adapters(model):
        m.train(m.base.training)  # a new layer takes the mode of the layer it wraps: eval stays eval
    holders = Counter(id(t) for _, t in [*model.named_parameters(remove_duplicate=False),
                                         *model.named_buffers(remove_duplicate=False)])
    with torch.no_grad():
        for module, name, t in saved:
            old = getattr(module, name)
            if holders[id(old)] > 1:  # tied (GPT-2's lm_head.weight is wte.weight): PEFT trains a copy of the
                # module, and the other holder keeps the shared tensor
                setattr(module, name, nn.Parameter(t.to(old).clone(), requires_grad=old.requires_grad))
            else:
                old.copy_(t)
    return [n for n, _ in _adapters(model)]


# -----------------------------------------------------------------------------
# The scripts' rules: a PEFT folder as --init_from (or --adapter), --export; a fault is one line naming the flag

FOLDER_FLAGS = {  # the flags a PEFT folder's config decides (its targets and shapes, not its lrs) -> PEFT's field
    "targets": "target_modules", "lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
    "vblora_r": "r", "vblora_b": "vector_length", "vblora_h": "num_vectors", "vblora_k": "topk", "bone_b": "r",
    "bone_grouping": None}  # a MiSS folder is Bone-col


def read_folder(path, flag="--init_from"):
    """read_peft(path), a fault being one line naming the flag."""
    try:
        return read_peft(path)
    except ValueError as e:
        raise SystemExit(f"error: {flag} {path}: {e}")


def base_of(init_from, peft):
    """Where the base weights come from: `peft`'s base_model_name_or_path (a PEFT folder), else init_from itself."""
    base = init_from if peft is None else peft["config"].get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise SystemExit(f"error: --init_from {init_from}: its {CONFIG} names no base_model_name_or_path, so the "
                         "base model is unknown")
    return base


def init_from(args):
    """--init_from and --export, checked once per run before any work -> (the PEFT folder --init_from is, as
    read_peft returns it, or None; where the base weights come from)."""
    path, peft = args.init_from, read_folder(args.init_from)  # its config checked here, before any work
    if peft is not None:  # the folder's adapter decides the method, its targets and its shapes
        c = peft["fields"]
        if PEFT_METHODS[c["peft_type"]] != args.method:
            raise SystemExit(f"error: --init_from {path} holds a PEFT {c['peft_type']} adapter: pass --method "
                             f"{PEFT_METHODS[c['peft_type']]}")
        for k, field in FOLDER_FLAGS.items():  # this method's flags: given, each must repeat the folder's
            v = getattr(args, k) if k.split("_")[0] in ("targets", args.method) else None
            if v is not None and (k == "targets" or v != (c[field] if field else "col")):
                sets = "the targets" if k == "targets" else f"{field}={c[field]!r}" if field else "Bone-col"
                raise SystemExit(f"error: --{k} {v}: --init_from {path} is a PEFT folder, whose {CONFIG} sets {sets}; "
                                 f"drop --{k}")
    base = None if path == "scratch" else base_of(path, peft)
    if args.export is not None:
        kind, out = args.export
        if kind not in ("peft", "lora"):
            raise SystemExit(f"error: --export {kind} {out}: the kind is peft (PEFT's own format: LoRA, VB-LoRA, "
                             f"Bone-col) or lora (any method's ΔW as plain LoRA)")
        if os.path.exists(out) and not os.path.isdir(out):
            raise SystemExit(f"error: --export {kind} {out}: that path is a file; expected a folder (new or holding "
                             f"an adapter to replace with --overwrite)")
        sources = [s if os.path.isdir(s) else os.path.dirname(s) for s in (path, base) if s and os.path.exists(s)]
        if any(os.path.realpath(out) == os.path.realpath(s) for s in sources):
            raise SystemExit(f"error: --export {kind} {out}: that folder is where this run's --init_from {path} comes "
                             f"from, which is never replaced; export to another folder")
        held = [f for f in (CONFIG, WEIGHTS) if os.path.exists(os.path.join(out, f))]
        if held and not args.overwrite:
            raise SystemExit(f"error: --export {kind} {out}: that folder holds an adapter ({', '.join(held)}); pass "
                             f"--overwrite to replace it")
    return peft, base


def check_export(args, model, layout):
    """--export peft, refused before training where PEFT cannot hold the model's adapter (then lora can)."""
    if args.export is not None and args.export[0] == "peft":
        why_not = why_not_peft(model, layout)
        if why_not:
            raise SystemExit(f"error: --export peft: PEFT cannot hold this adapter on this model: {why_not}; use "
                             f"--export lora {args.export[1]}")


def export_adapter(args, model, layout, base, modules_to_save=None, log=print):
    """Write the trained adapter for the Hugging Face model `layout` maps onto: PEFT's format, or plain LoRA."""
    kind, path = args.export
    save = save_peft if kind == "peft" else save_lora
    save(model, path, layout=layout, modules_to_save=modules_to_save, base_model_name_or_path=base)
    log(f"exported the adapter as {'a PEFT' if kind == 'peft' else 'a plain LoRA'} folder: {path}")
