"""Adapter files other tools read: Hugging Face PEFT's folder format, in and out, and a plain-LoRA export
that any LoRA-only server (vLLM, PEFT itself) loads.

A PEFT folder holds two files:
    adapter_config.json         {"peft_type": "LORA" | "VBLORA" | "MISS", "r": ..., "target_modules": [...], ...}
    adapter_model.safetensors   "base_model.model.<module>.<tensor>" -> tensor (no adapter name in the key)

nanopeft <-> PEFT 0.21 (every other config field at PEFT's default):

    nanopeft                   peft_type, config                   tensors after base_model.model.<module>.
    LoRA (r, alpha)            LORA r, lora_alpha                  lora_A.weight (r, in), lora_B.weight (out, r)
    VB-LoRA (r, b, h, k)       VBLORA r, vector_length=b,          vblora_logits_A (r, in/b, h), vblora_logits_B
                               num_vectors=h, topk=k               (out/b, r, h): ours as they are; the bank is
                                                                   one key, base_model.vblora_vector_bank (h, b)
    Bone-col, "bone"           MISS r=b, init_weights="bat"        miss_block (out/b, b, b) = bone_B
    Bone-col, "unconstrained"  MISS r=b, init_weights=True         miss_block (b, out) = bone_B.reshape(out, b)^T
    SeRA, SiVA, Bone-row,      none: save_lora writes their ΔW as plain LoRA
    Bone "hadamard"

Conventions read from PEFT's code:
- LoRA's scale is lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; load_peft sets our alpha so that
  alpha / r is that scale. rank_pattern / alpha_pattern give per-module r and alpha: PEFT takes the first key k
  with re.match(rf"(.*\\.)?({k})$", module name); we write escaped full module names, which match only themselves.
- MiSS "bat": W'_ij = W_ij + W_ij B_i + B_i per b×b block, Bone-col exactly. MiSS default: y += (Σ_j x_j) M with
  M (r, out), so ΔW_ij = M[:, i-th block]^T: Bone-col "unconstrained". Where r does not divide in, MiSS pads x;
  Bone has no padding, so such files are refused. "mini" ties copies of one (r, mini_r) block, which our Bone
  cannot tie, so it is refused too.
- VB-LoRA with save_only_topk_weights stores <logits>_topk_indices (uint8 for h < 256, int16 for h < 2^15) and
  <logits>_topk_weights, the first k-1 softmax weights of each row (the last is 1 - Σ). Such a file is for
  inference only: we load logits log(w) at the indices and the dtype's lowest value elsewhere, which give the same
  top-k and the same weights, but never select anew. save_peft writes full logits.
- modules_to_save (a module trained whole, e.g. a new classifier head) is saved as the module's own state dict,
  "base_model.model.<module>.<param>", and listed by name in the config. load_peft copies such tensors into the
  matching module of the model (found through the layout), checked like the adapter's. PEFT trains a copy of the
  module, so a weight the module shares (GPT-2's lm_head is wte) becomes the module's own first.
- Which modules take the adapter: PEFT's check_target_module_exists, read field for field (target_modules as a
  list of name suffixes or a regex, exclude_modules, layers_to_transform with layers_pattern, modules_to_save
  never). Tensors of the modules it leaves out are left unread, as in PEFT.

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
_NAMES = {lora.LoRALinear: "LoRA", sera.SeRALinear: "SeRA", siva.SiVALinear: "SiVA", bone.BoneLinear: "Bone",
          vblora.VBLoRALinear: "VB-LoRA"}
# LoRA options that change the maths (a forward, a weight, a module) and that our LoRA does not have
_LORA_UNSUPPORTED = ("use_dora", "use_qalora", "alora_invocation_tokens", "layer_replication", "lora_bias",
                     "trainable_token_indices", "target_parameters", "megatron_config", "use_bdlora", "arrow_config",
                     "velora_config", "monteclora_config", "kasa_config", "ensure_weight_tying")


def identity_layout(name):
    return name, 0, 1, False


def gpt2_layout(name):
    """Our compact GPT-2 (model_gpt2.GPT) -> Hugging Face's GPT2LMHeadModel: q, k, v are parts 0, 1, 2 of the
    Conv1D attn.c_attn (weight (C, 3C), output [q | k | v]); every Conv1D is fan_in_fan_out."""
    m = re.fullmatch(r"(transformer\.h\.\d+\.attn)\.([qkv])_proj", name)
    if m:
        return f"{m[1]}.c_attn", "qkv".index(m[2]), 3, True
    conv1d = re.fullmatch(r"transformer\.h\.\d+\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)", name)
    return name, 0, 1, bool(conv1d)


_VIT = {  # ours -> Hugging Face's, in transformers >= 5 | < 5 (the names in the Hub's ViT checkpoints)
    "attn.q_proj": ("attention.q_proj", "attention.attention.query"),
    "attn.k_proj": ("attention.k_proj", "attention.attention.key"),
    "attn.v_proj": ("attention.v_proj", "attention.attention.value"),
    "attn.out_proj": ("attention.o_proj", "attention.output.dense"),
    "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
    "mlp.fc2": ("mlp.fc2", "output.dense"),
}


def vit_layout(name, transformers4=False):
    """Our compact ViT (model_vit.ViT) -> Hugging Face's ViTForImageClassification; head -> classifier. Its
    module names changed in transformers 5 (vit.layers.{i}.attention.q_proj, was vit.encoder.layer.{i}.attention.
    attention.query), and PEFT 0.21 does not rename adapter keys for ViT: pick the target's with transformers4,
    e.g. functools.partial(vit_layout, transformers4=True)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m and m[2] in _VIT:
        block = f"vit.encoder.layer.{m[1]}" if transformers4 else f"vit.layers.{m[1]}"
        return f"{block}.{_VIT[m[2]][transformers4]}", 0, 1, False
    return "classifier" if name == "head" else name, 0, 1, False


def _adapters(model):
    return [(n, m) for n, m in model.named_modules() if type(m) in _NAMES]


def _write(path, peft_type, cfg, tensors, modules_to_save, base_model_name_or_path):
    for module, params in (modules_to_save or {}).items():
        for p, t in params.items():
            tensors[f"{PREFIX}{module}.{p}"] = t  # PEFT's form: the module's own state dict
    cfg = {"peft_type": peft_type, "task_type": None, "base_model_name_or_path": base_model_name_or_path,
           "inference_mode": True, "modules_to_save": sorted(modules_to_save) if modules_to_save else None, **cfg}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {k: t.detach().cpu().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


def _number(x):
    return int(x) if float(x).is_integer() else x


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
            starts = [sum(x.shape[0] for x in As[:i]) for i in range(len(As))]
            same = [st for x, st in zip(As, starts) if x.shape == a.shape and torch.equal(x, a)]
            cols.append(same[0] if same else sum(x.shape[0] for x in As))
            As += [] if same else [a]
        A = torch.cat(As)  # (R, in), R = Σ r_p over distinct A_p
        B = A.new_zeros(n * out, A.shape[0])  # (n*out, R): absent parts keep zero rows
        for (p, _, _, a, b, sp), col in zip(parts, cols):
            B[p * out:(p + 1) * out, col:col + a.shape[0]] = b * (sp / s)  # one scale s per module: fold the ratio
        tensors[f"{PREFIX}{their}.lora_A.weight"], tensors[f"{PREFIX}{their}.lora_B.weight"] = A, B
        rank[their], alpha[their] = A.shape[0], _number(s * A.shape[0])  # scale = lora_alpha / R = s
    first = next(iter(groups))
    cfg = {"r": rank[first], "lora_alpha": alpha[first], "lora_dropout": dropout, "use_rslora": False,
           "fan_in_fan_out": any(where(n)[3] for n in factors), "bias": "none", "target_modules": sorted(groups),
           "rank_pattern": {re.escape(t): r for t, r in rank.items() if r != rank[first]},
           "alpha_pattern": {re.escape(t): a for t, a in alpha.items() if a != alpha[first]}}
    _write(path, "LORA", cfg, tensors, modules_to_save, base_model_name_or_path)


def _why_not_peft(m, n_parts, fifo, first):
    """Why PEFT has no exact form for layer m, or None."""
    if isinstance(m, (sera.SeRALinear, siva.SiVALinear)):
        return "PEFT has no such method"
    if isinstance(m, vblora.VBLoRALinear) and n_parts > 1:
        return ("it is one part of a fused module; the other parts would need zero sub-vectors, which a top-k "
                "mix of bank vectors cannot make")
    if isinstance(m, bone.BoneLinear):
        if m.cfg.grouping == "row":
            return "PEFT's MiSS has no Bone-row (one B per input column-block)"
        if m.cfg.variant == "hadamard":
            return "PEFT's MiSS has no 'hadamard' variant"
        if n_parts > 1 or fifo:
            return "PEFT's MiSS takes only nn.Linear targets, not a fused or fan_in_fan_out (Conv1D) module"
        if (m.cfg.b, m.cfg.variant) != (first.cfg.b, first.cfg.variant):
            return "a MiSS folder has one r and one init_weights; this layer's b or variant differs from the first's"
    return None


def why_not_peft(model, layout=None):
    """Why `model`'s adapters have no exact PEFT form under `layout` (one line, naming the way out), or None."""
    where, layers = layout or identity_layout, _adapters(model)
    if not layers:
        return "the model holds no nanopeft adapter"
    kinds = sorted({_NAMES[type(m)] for _, m in layers})
    if len(kinds) > 1:
        return f"a PEFT folder holds one method; the model mixes {kinds}. save_lora writes any mix as one plain LoRA"
    for ours, m in layers:
        why = _why_not_peft(m, *where(ours)[2:], layers[0][1])
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
    R = min(rank or m.cfg.b, *dW.shape)  # no rank given: only Bone comes here, and gets its block size b
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)  # (out, n), (n,), (n, in)
    err = (S[R:].norm() / S.norm()).item() if S.norm() > 0 else 0.0
    return Vh[:R].to(ct), (U[:, :R] * S[:R]).to(ct), err


@torch.no_grad()
def save_lora(model, path, rank=None, layout=None, modules_to_save=None, base_model_name_or_path=None):
    """Every adapted layer's ΔW, any method, as one plain PEFT LoRA folder (scale 1: lora_alpha = r per module).
    Exact where the method factorises within `rank`: LoRA (r), SeRA (r), VB-LoRA (r), SiVA (k); else (Bone, or a
    smaller rank) the SVD of ΔW truncated to `rank` (Bone's default: b), and one printed line with the largest
    relative Frobenius error. Returns {our name: relative error}, 0.0 where exact."""
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
            worst = (err, ours, _NAMES[type(m)], A.shape[0])
    _lora_folder(path, factors, layout or identity_layout, 0.0, modules_to_save, base_model_name_or_path)
    if worst:
        err, ours, kind, r = worst
        print(f"save_lora: {kind} ΔW truncated to rank {r} by SVD: relative error up to {err:.3g} ({ours})")
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
# Reading a PEFT folder: every field of its config honoured as PEFT 0.21 honours it or refused by name, every
# check before the model changes, any fault one ValueError line naming the file and the field

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# where the adapter came from and how PEFT wraps the model: no effect on the maths
_BASE_FIELDS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode"}
# which modules the adapter goes on, read by _selected as PEFT's check_target_module_exists reads them
_SELECT_FIELDS = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save",
                  "fan_in_fan_out", "bias"}
_FIELDS = {  # per peft_type: the fields read below, or that only start what the file's tensors then replace
    "LORA": {"r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern", "init_lora_weights",
             "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size",
             "runtime_config", *_LORA_UNSUPPORTED},
    "VBLORA": {"r", "num_vectors", "vector_length", "topk", "save_only_topk_weights", "vblora_dropout",
               "init_vector_bank_bound", "init_logits_std"},
    "MISS": {"r", "miss_dropout", "mini_r", "init_weights"},
}
_DEFAULTS = {"LORA": dict(r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False, rank_pattern={}, alpha_pattern={},
                          init_lora_weights=True),
             "VBLORA": dict(r=4, num_vectors=256, vector_length=256, topk=2, save_only_topk_weights=False,
                            vblora_dropout=0.0),
             "MISS": dict(r=64, init_weights=True, miss_dropout=0.0)}  # PEFT 0.21's, for absent fields


def _is_int(v, low):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_regex(v):
    try:
        re.compile(v)
        return True
    except (re.error, TypeError):
        return False


def _is_names(v):
    """A regex, or a list of names (PEFT's form of both target_modules and exclude_modules)."""
    return _is_regex(v) if isinstance(v, str) else isinstance(v, list) and all(isinstance(x, str) for x in v)


def check_config(cfg, where=CONFIG):
    """`cfg` (an adapter_config.json) as load_peft reads it, PEFT 0.21's defaults filled in; a field that nanopeft
    cannot honour as PEFT does, or that holds what PEFT could not read, is one ValueError naming it."""
    def bad(name, expected):
        raise ValueError(f"load_peft: {where}: {name}={cfg.get(name)!r}: expected {expected}")

    kind = cfg.get("peft_type")
    if kind not in _LOADERS:
        raise ValueError(f"load_peft: {where}: peft_type {kind!r} has no nanopeft form; {sorted(_LOADERS)} load")
    unknown = sorted(k for k, v in cfg.items() if k not in _BASE_FIELDS | _SELECT_FIELDS | _FIELDS[kind]
                     and v not in (None, False, {}, [], ""))
    if unknown:
        raise ValueError(f"load_peft: {where}: {unknown}: not fields of PEFT 0.21's {kind}, so nanopeft cannot tell "
                         "what they do; expected them absent or unset")
    bad_lora = [f for f in _LORA_UNSUPPORTED if kind == "LORA" and cfg.get(f)]
    if bad_lora:
        raise ValueError(f"load_peft: LoRA option(s) {bad_lora} change the maths; nanopeft's LoRA has none of them "
                         f"({where})")
    c = {**_DEFAULTS[kind], **cfg}
    # the modules it goes on
    t = c.get("target_modules")
    if t is None or t == "all-linear" or not _is_names(t):
        bad("target_modules", "a list of module names or a regex (PEFT saves the modules it picked)")
    if c.get("exclude_modules") is not None and not _is_names(c["exclude_modules"]):
        bad("exclude_modules", "null, a list of module names or a regex")
    layers = c.get("layers_to_transform")
    if not (layers is None or _is_int(layers, 0) or isinstance(layers, list) and all(_is_int(x, 0) for x in layers)):
        bad("layers_to_transform", "null, a layer index or a list of them")
    pats = c.get("layers_pattern")
    if not (pats is None or _is_regex(pats) or isinstance(pats, list) and all(_is_regex(p) for p in pats)):
        bad("layers_pattern", "null, a regex or a list of them")
    mts = c.get("modules_to_save")
    if not (mts is None or isinstance(mts, list) and all(isinstance(m, str) and _is_regex(m) for m in mts)):
        bad("modules_to_save", "null or a list of module names")
    if not isinstance(c.get("fan_in_fan_out", False), bool):  # PEFT sets it from each module's type anyway
        bad("fan_in_fan_out", "true or false")
    if c.get("bias", "none") != "none":
        bad("bias", "'none' (PEFT then also trains and saves the model's biases; nanopeft's adapters have none)")
    # the method's own fields
    if not _is_int(c["r"], 1):
        bad("r", "an int >= 1")
    if kind == "LORA":
        if not (_is_number(c["lora_alpha"]) and c["lora_alpha"] > 0):
            bad("lora_alpha", "a finite number > 0")
        if not (_is_number(c["lora_dropout"]) and 0 <= c["lora_dropout"] < 1):
            bad("lora_dropout", "a number in [0, 1)")
        if not isinstance(c["use_rslora"], bool):
            bad("use_rslora", "true or false")
        if c["init_lora_weights"] not in (True, False, "gaussian"):  # the others also rewrite the base weights
            bad("init_lora_weights", "true, false or 'gaussian' (PiSSA, OLoRA, LoftQ, EVA, CorDA... change the base "
                "weights or the layer, which nanopeft does not do)")
        for name, ok, what in (("rank_pattern", lambda v: _is_int(v, 1), "an int >= 1"),
                               ("alpha_pattern", lambda v: _is_number(v) and v > 0, "a finite number > 0")):
            c[name] = c[name] or {}
            if not isinstance(c[name], dict):
                bad(name, "an object {module regex: value}")
            for k, v in c[name].items():
                if not _is_regex(rf"(.*\.)?({k})$") or not ok(v):
                    raise ValueError(f"load_peft: {where}: {name} {k!r}: {v!r}: expected a valid regex key and {what}")
    elif kind == "VBLORA":
        for name in ("num_vectors", "vector_length", "topk"):
            if not _is_int(c[name], 1):
                bad(name, "an int >= 1")
        if c["topk"] > c["num_vectors"]:
            bad("topk", f"at most num_vectors={c['num_vectors']}")
        if not isinstance(c["save_only_topk_weights"], bool):
            bad("save_only_topk_weights", "true or false")
        if c["vblora_dropout"] != 0:
            bad("vblora_dropout", "0 (nanopeft's VB-LoRA has no dropout)")
    else:
        if c["init_weights"] == "mini":
            raise ValueError(f"load_peft: {where}: MiSS init_weights='mini' ties copies of one (r, mini_r) block "
                             "across out; nanopeft's Bone has no such tie")
        if c["init_weights"] not in (True, False, "bat"):
            bad("init_weights", "true, false or 'bat'")
        if c["init_weights"] != "bat" and c["miss_dropout"] != 0:  # "bat" has no dropout in PEFT either
            bad("miss_dropout", "0 (nanopeft's Bone has no dropout)")
    return c


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


def _select(model, cfg, sd, inv, suffixes, file):
    """The modules holding tensors in `sd` that PEFT puts the adapter on. Tensors of the others are dropped, as
    PEFT leaves them unread; a selected nn.Linear of the model without tensors is refused (PEFT would start it
    from its initialisation)."""
    found = _module_names(sd, suffixes)
    for their in found:
        if not _selected(cfg, their):
            for s in suffixes:
                sd.pop(f"{PREFIX}{their}{s}", None)
    idle = sorted(their for their, parts in inv.items() if their not in found and _selected(cfg, their) and
                  all(isinstance(model.get_submodule(o), nn.Linear) for o, _, _ in parts.values()))
    chosen = [their for their in found if _selected(cfg, their)]
    if idle or not chosen:
        raise ValueError(f"load_peft: {file}: holds no tensors for {idle[:4] or 'any module'} that target_modules "
                         "selects in the model")
    return chosen


def _target(model, inv, their):
    """Our parts of their module {part: (our name, n_parts, fan_in_fan_out)}, and one part's in, out."""
    parts = inv.get(their)
    lins = [model.get_submodule(o) for o, _, _ in (parts or {}).values()]
    if not lins or not all(isinstance(l, nn.Linear) for l in lins) or len({l.weight.shape for l in lins}) > 1:
        raise ValueError(f"load_peft: the adapter targets {their!r}, which maps to no nn.Linear (or unequal ones) "
                         "of the model; check the layout")
    return parts, lins[0].in_features, lins[0].out_features


def _module_names(sd, suffixes):
    return sorted({k[len(PREFIX):-len(s)] for k in sd for s in suffixes if k.startswith(PREFIX) and k.endswith(s)})


def _pattern(patterns, their, default):
    for k, v in (patterns or {}).items():  # PEFT's get_pattern_key: the first key that matches
        if re.match(rf"(.*\.)?({k})$", their):
            return v
    return default


def _check(sd, expected, file):
    """The file's keys, shapes and dtypes against what the model needs, before anything changes.
    expected: key -> (shape, h): h None for a float tensor, else integer indices in [0, h)."""
    missing, extra = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"load_peft: {file}: keys differ from what the model needs: missing {missing[:4]}, "
                         f"unexpected {extra[:4]}")
    for key, (shape, h) in expected.items():
        t = sd[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"load_peft: {file}: {key} has shape {tuple(t.shape)}, the model needs {tuple(shape)}")
        # bool and complex are neither: a float tensor or integer indices, as the key needs
        index = not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
        ok = t.is_floating_point() if h is None else index
        if not ok:
            raise ValueError(f"load_peft: {file}: {key} holds {t.dtype}; expected "
                             f"{'a floating-point tensor' if h is None else 'integer indices'}")
        if h is None and not torch.isfinite(t).all():
            raise ValueError(f"load_peft: {file}: {key} holds non-finite values")
        if h is not None and t.numel() and (t.min() < 0 or t.max() >= h):
            raise ValueError(f"load_peft: {file}: {key} holds indices outside [0, {h})")


def _load_lora(model, cfg, sd, inv, file):
    expected, plan = {}, []
    for their in _select(model, cfg, sd, inv, (".lora_A.weight", ".lora_B.weight"), file):
        parts, d_in, d_out = _target(model, inv, their)
        n = next(iter(parts.values()))[1]
        r = _pattern(cfg["rank_pattern"], their, cfg["r"])
        expected[f"{PREFIX}{their}.lora_A.weight"] = ((r, d_in), None)
        expected[f"{PREFIX}{their}.lora_B.weight"] = ((n * d_out, r), None)
        plan.append((their, parts, n, d_out, r))
    _check(sd, expected, file)
    groups, ours_sd = {}, {}
    for their, parts, n, d_out, r in plan:
        A, B = sd[f"{PREFIX}{their}.lora_A.weight"], sd[f"{PREFIX}{their}.lora_B.weight"]
        alpha = _pattern(cfg["alpha_pattern"], their, cfg["lora_alpha"])
        s = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
        for p in range(n):
            Bp = B[p * d_out:(p + 1) * d_out]  # (out, r): this part's rows
            keep = Bp.ne(0).any(0) if n > 1 else torch.ones(r, dtype=torch.bool)  # (r,): the columns it uses
            if not keep.any():
                continue  # ΔW_p = 0: leaving the part plain is exact
            if p not in parts:
                raise ValueError(f"load_peft: {file}: part {p} of {their!r} has a non-zero B and maps to no module")
            ours, rp = parts[p][0], int(keep.sum())
            groups.setdefault((rp, s * rp), []).append(ours)  # our alpha / r = PEFT's scale
            ours_sd[f"{ours}.lora_A"], ours_sd[f"{ours}.lora_B"] = A[keep], Bp[:, keep]  # (rp, in), (out, rp)
    configs = {k: lora.LoRAConfig(r=k[0], alpha=k[1], dropout=cfg["lora_dropout"]) for k in groups}

    def apply():
        for k, names in groups.items():
            lora.apply_lora(model, configs[k], names)
        lora.load_lora_state_dict(model, ours_sd)
    return apply


def _load_vblora(model, cfg, sd, inv, file):
    vcfg = vblora.VBLoRAConfig(r=cfg["r"], b=cfg["vector_length"], h=cfg["num_vectors"], k=cfg["topk"])
    r, b, h, k = vcfg.r, vcfg.b, vcfg.h, vcfg.k
    leaves = {"_topk_indices": "idx", "_topk_weights": "w"} if cfg["save_only_topk_weights"] else {"": "logits"}
    last = {"": (h, None), "_topk_indices": (k, h), "_topk_weights": (k - 1, None)}  # last dim, index bound
    expected, plan = {BANK_KEY: ((h, b), None)}, []
    for their in _select(model, cfg, sd, inv, [f".vblora_logits_{s}{leaf}" for s in "AB" for leaf in leaves], file):
        parts, d_in, d_out = _target(model, inv, their)
        n = next(iter(parts.values()))[1]
        if len(parts) < n or d_in % b or d_out % b:
            raise ValueError(f"load_peft: VB-LoRA on {their!r} needs every one of its {n} part(s) in the model "
                             f"and b={b} dividing in={d_in} and out={d_out}")
        for leaf in leaves:
            dim, bound = last[leaf]
            expected[f"{PREFIX}{their}.vblora_logits_A{leaf}"] = ((r, d_in // b, dim), bound)
            expected[f"{PREFIX}{their}.vblora_logits_B{leaf}"] = ((n * d_out // b, r, dim), bound)
        plan.append((their, parts, d_out // b))
    _check(sd, expected, file)
    for key, t in sd.items():  # a top-k file: k distinct indices and k - 1 weights that leave the last >= 0
        if key.endswith("_topk_indices") and (t.long().sort(-1).values.diff(dim=-1) == 0).any():
            raise ValueError(f"load_peft: {file}: {key} repeats an index within a row; expected {k} distinct ones")
        over = t.float().sum(-1).max() > 1 + 1e-5 if t.numel() else False  # a row's sum, rounding aside
        if key.endswith("_topk_weights") and t.numel() and (t.min() < 0 or t.max() > 1 or over):
            raise ValueError(f"load_peft: {file}: {key} holds weights outside [0, 1] or rows that sum above 1")
    ours_sd, names = {"vblora_bank.vectors": sd[BANK_KEY]}, []
    for their, parts, rows in plan:
        for p, (ours, _, _) in sorted(parts.items()):
            names.append(ours)
            for leaf, short in leaves.items():
                ours_sd[f"{ours}.vblora_{short}_A"] = sd[f"{PREFIX}{their}.vblora_logits_A{leaf}"]  # A is shared
                B = sd[f"{PREFIX}{their}.vblora_logits_B{leaf}"]  # (n*out/b, r, .)
                ours_sd[f"{ours}.vblora_{short}_B"] = B[p * rows:(p + 1) * rows]  # (out/b, r, .): part p's rows

    def apply():
        vblora.apply_vblora(model, vcfg, names)
        vblora.load_vblora_state_dict(model, ours_sd)
    return apply


def _load_miss(model, cfg, sd, inv, file):
    r, bat = cfg["r"], cfg["init_weights"] == "bat"
    expected, ours_sd = {}, {}
    for their in _select(model, cfg, sd, inv, (".miss_block",), file):
        parts, d_in, d_out = _target(model, inv, their)
        (ours, n, fifo), *more = parts.values()
        if more or n > 1 or fifo:
            raise ValueError(f"load_peft: MiSS on {their!r}: MiSS takes only a whole nn.Linear, not a fused or "
                             "fan_in_fan_out module")
        if d_in % r or d_out % r:
            raise ValueError(f"load_peft: MiSS r={r} does not divide {their!r} (in={d_in}, out={d_out}); MiSS pads "
                             "x there, and Bone's b×b blocks have no padding")
        key = f"{PREFIX}{their}.miss_block"
        expected[key] = (((d_out // r, r, r) if bat else (r, d_out)), None)
        ours_sd[f"{ours}.bone_B"] = key
    _check(sd, expected, file)
    # bat: miss_block is bone_B; default (r, out) -> (out, r) -> (out/r, r, r): B_i = M[:, i-th block]^T
    ours_sd = {n: sd[k] if bat else sd[k].T.reshape(-1, r, r) for n, k in ours_sd.items()}
    bcfg = bone.BoneConfig(b=r, grouping="col", variant="bone" if bat else "unconstrained")

    def apply():
        bone.apply_bone(model, bcfg, [n.rpartition(".")[0] for n in ours_sd])
        bone.load_bone_state_dict(model, ours_sd)
    return apply


_LOADERS = {"LORA": _load_lora, "VBLORA": _load_vblora, "MISS": _load_miss}
PEFT_METHODS = {"LORA": "lora", "VBLORA": "vblora", "MISS": "bone"}  # peft_type -> the nanopeft method it loads as


def peft_config(path):
    """The adapter_config.json of a PEFT folder as a dict, or None when `path` is no such folder. A config that is
    not a JSON object, or an adapter_model.safetensors without one, is a ValueError line naming the file."""
    path = str(path)
    file = os.path.join(path, CONFIG)
    if not os.path.isdir(path):
        return None
    if not os.path.isfile(file):
        if os.path.exists(os.path.join(path, WEIGHTS)):
            raise ValueError(f"{path} holds {WEIGHTS} but no {CONFIG}; a PEFT folder needs both")
        return None
    try:
        with open(file, encoding="utf-8") as f:
            cfg = json.load(f)
    except ValueError as e:  # not JSON, not UTF-8
        raise ValueError(f"{file} is not JSON ({e}); expected PEFT's config as a JSON object")
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} holds a JSON {type(cfg).__name__}; expected PEFT's config as a JSON object")
    return cfg


def read_peft(path):
    """(config, tensors) of the PEFT folder at `path`, read as data; any fault is one ValueError line naming the
    file."""
    cfg = peft_config(path)
    if cfg is None:
        raise ValueError(f"load_peft: {path}: no {CONFIG} there; a PEFT folder holds {CONFIG} and {WEIGHTS}")
    file = os.path.join(str(path), WEIGHTS)
    if not os.path.isfile(file) or os.path.getsize(file) == 0:
        raise ValueError(f"load_peft: {file}: {'an empty file' if os.path.isfile(file) else 'no such file'}; "
                         "expected the adapter's tensors (safetensors)")
    try:
        sd = load_file(file)  # safetensors checks every offset against the file's size before it reads
    except Exception as e:
        raise ValueError(f"load_peft: {file}: not a readable safetensors file (truncated, or a header that does "
                         f"not fit its data): {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
    return cfg, sd


def _saved_modules(model, cfg, sd, inv, file):
    """Pop the modules_to_save tensors from sd, each as (our module, parameter name, tensor)."""
    entries, own, out = cfg.get("modules_to_save") or [], model.state_dict(), []
    for key in [k for k in sd if k.startswith(PREFIX)]:
        parts = key[len(PREFIX):].split(".")
        for i in range(1, len(parts)):  # PEFT names a wrapped module by a suffix of its name
            their, param = ".".join(parts[:i]), ".".join(parts[i:])
            if any(their == e or their.endswith("." + e) for e in entries):
                break
        else:
            continue
        mapped = list(inv.get(their, {}).values())
        ours, n, fifo = mapped[0] if len(mapped) == 1 else (None, 0, False)
        target = own.get(f"{ours}.{param}") if n == 1 else None  # a whole module, not a part of a fused one
        t = sd.pop(key)
        t = t.T if fifo and param == "weight" else t  # a Conv1D weight is (in, out)
        if target is None or t.shape != target.shape or not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"load_peft: {file}: modules_to_save {key} ({tuple(t.shape)}, {t.dtype}) fits no "
                             "tensor of the model, or holds non-finite values; check the layout")
        module, _, name = f"{ours}.{param}".rpartition(".")
        out.append((model.get_submodule(module), name, t))
    return out


def _tied(model):
    """ids of the tensors that more than one name of `model` holds (GPT-2's lm_head.weight is wte.weight)."""
    seen = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for _, t in tensors:
        seen[id(t)] = seen.get(id(t), 0) + 1
    return {i for i, c in seen.items() if c > 1}


def apply_peft(model, cfg, sd, layout=None, where="the PEFT folder"):
    """load_peft from a config dict and its tensors, as read from the folder `where` (named in messages)."""
    file = os.path.join(str(where), WEIGHTS)
    cfg = check_config(cfg, os.path.join(str(where), CONFIG))
    if _adapters(model):
        raise ValueError("load_peft: the model already holds nanopeft adapters; load into a plain model")
    sd, inv = dict(sd), _inverse(model, layout or identity_layout)
    saved = _saved_modules(model, cfg, sd, inv, file)
    apply = _LOADERS[cfg["peft_type"]](model, cfg, sd, inv, file)
    # every check has passed: from here on the model changes
    apply()
    for _, m in _adapters(model):
        m.train(m.base.training)  # a new layer takes the mode of the layer it wraps: eval stays eval
    tied = _tied(model)
    with torch.no_grad():
        for module, name, t in saved:
            old = getattr(module, name)
            if id(old) in tied:  # PEFT trains a copy of the module: the other holder keeps the shared tensor
                setattr(module, name, nn.Parameter(t.to(old).clone(), requires_grad=old.requires_grad))
            else:
                old.copy_(t)
    return [n for n, _ in _adapters(model)]


def load_peft(model, path, layout=None):
    """Apply the PEFT folder at `path` (LORA, VBLORA or MISS) to the plain `model` as the matching nanopeft
    method and load its tensors, and its modules_to_save into the model's own modules (a tensor the module shares
    with another, as GPT-2's tied head, becomes the module's own, as in PEFT); returns the adapted names (ours).
    Every field of the config is honoured as PEFT 0.21 honours it or refused by name; every check runs before the
    model changes; the new layers take the training mode of the layers they wrap."""
    return apply_peft(model, *read_peft(path), layout, path)
