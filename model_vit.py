"""A compact ViT, as nanoGPT's model.py: the model and its checkpoints (a file, a folder, the Hub).

Pre-norm ViT: class token, learned position embeddings, q/k/v as separate Linears named attn.q_proj /
attn.k_proj / attn.v_proj so methods target them as the papers count them, attn.out_proj, mlp.fc1 / mlp.fc2,
final norm, head; attention by F.scaled_dot_product_attention. Every Linear is called as a module (never
through its .weight), so an adapter swapped in for it is always used.

Checkpoints: Google's ImageNet-21k ViTs in Hugging Face's layout (`vit-base` =
google/vit-base-patch16-224-in21k, `vit-large` = google/vit-large-patch16-224-in21k, or any repo id with that
layout), fetched with huggingface_hub (its cache first) and copied key for key with shape checks; no
transformers at run time. Their pooler (the in21k pre-logits layer) is dropped: the head reads the class
token after the final norm, as HF's ViTForImageClassification does. Position embeddings are interpolated
(bicubic) when the image size gives another patch grid than the checkpoint's. A full fine-tune's saved
adapter is a checkpoint too (its saved n_head is used; its head only when its class names are the data's).

    model = build_model(args, num_classes=10)      # --init_from scratch | vit-base | a repo id | a path
"""
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Missing, read_safetensors, unreachable, why

# -----------------------------------------------------------------------------
# model


@dataclass
class ViTConfig:
    image_size: int = 224  # input side; the patch grid is image_size // patch_size squared
    patch_size: int = 16  # ViT-B/16, ViT-L/16
    n_layer: int = 12  # ViT-B depth; a checkpoint's own count of blocks overrides it
    n_head: int = 12  # ViT-B; not in the weights, so read from config.json (else n_embd // 64)
    n_embd: int = 768  # ViT-B width; the checkpoint's class token gives the real one
    mlp_dim: int = 3072  # 4 * n_embd in every Google ViT
    num_classes: int = 10  # sets the head's size: the fine-tuning dataset's classes
    ln_eps: float = 1e-12  # what Google's HF checkpoints were trained with (config layer_norm_eps)


class Attention(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_proj(y)


class MLP(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.n_embd, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.n_embd)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the checkpoints' "gelu"


class Block(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):

    def __init__(self, cfg):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"ViT: patch_size={cfg.patch_size} must divide image_size={cfg.image_size}")
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"ViT: n_head={cfg.n_head} must divide n_embd={cfg.n_embd}")
        self.cfg = cfg
        n_patch = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, cfg.n_embd, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patch + 1, cfg.n_embd))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.head.weight)  # a zero head starts every class equal, as ViT fine-tuning does

    def forward(self, x):
        x = self.patch_embed(x)  # (B, C, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, 1+N, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))  # (B, num_classes)


# -----------------------------------------------------------------------------
# pretrained weights

HUB_MODELS = {"vit-base": "google/vit-base-patch16-224-in21k", "vit-large": "google/vit-large-patch16-224-in21k"}
_HF_TOP = {  # HF ViTModel name -> ours, outside the blocks
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection": "patch_embed",
    "layernorm": "norm",
    "classifier": "head",  # only ViTForImageClassification checkpoints have one
}
_HF_BLOCK = {  # encoder.layer.{i}.<HF> -> blocks.{i}.<ours>
    "layernorm_before": "ln_1",
    "attention.attention.query": "attn.q_proj",
    "attention.attention.key": "attn.k_proj",
    "attention.attention.value": "attn.v_proj",
    "attention.output.dense": "attn.out_proj",
    "layernorm_after": "ln_2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF5_BLOCK = {  # ours -> transformers >= 5's names in vit.layers.{i}, which its ViT renames the checkpoints' keys to
    "attn.q_proj": "attention.q_proj", "attn.k_proj": "attention.k_proj", "attn.v_proj": "attention.v_proj",
    "attn.out_proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def hf_to_vit(sd):
    """Rename a HF ViTModel / ViTForImageClassification state dict to ours; unknown keys pass through."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("vit.")
        if k.startswith("pooler."):
            continue  # the in21k pre-logits layer; fine-tuning reads the normed class token instead
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", k)
        if m and m[2] in _HF_BLOCK:
            k = f"blocks.{m[1]}.{_HF_BLOCK[m[2]]}.{m[3]}"
        elif k in _HF_TOP:
            k = _HF_TOP[k]
        elif k.rpartition(".")[0] in _HF_TOP:
            mod, _, p = k.rpartition(".")
            k = f"{_HF_TOP[mod]}.{p}"
        out[k] = v
    return out


def vit_layout(name, transformers4=False):
    """interop's layout from our module names to Hugging Face's ViTForImageClassification's, for its adapters;
    head -> classifier. PEFT 0.21 does not rename adapter keys for ViT, so pick the target's names: transformers >= 5
    (vit.layers.{i}.attention.q_proj), or with transformers4 the checkpoints' own (vit.encoder.layer.{i}.attention.
    attention.query), e.g. functools.partial(vit_layout, transformers4=True)."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if m and m[2] in _HF5_BLOCK:
        if transformers4:  # the name hf_to_vit renames to ours
            return f"vit.encoder.layer.{m[1]}.{next(k for k, v in _HF_BLOCK.items() if v == m[2])}", 0, 1, False
        return f"vit.layers.{m[1]}.{_HF5_BLOCK[m[2]]}", 0, 1, False
    return "classifier" if name == "head" else name, 0, 1, False


def resize_pos_embed(pos, n_patch):
    """(1, 1+g*g, C) -> (1, 1+n_patch, C): bicubic on the square grid; the class slot is kept."""
    g, g_new = math.isqrt(pos.shape[1] - 1), math.isqrt(n_patch)
    grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, C, g, g)
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)  # (1, C, g', g')
    grid = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1).to(pos.dtype)  # (1, g'*g', C)
    return torch.cat([pos[:, :1], grid], dim=1)


def load_weights(model, sd):
    """Copy a state dict in our naming into model, with a clear error for any missing, unexpected or
    mis-shaped tensor. The head is loaded only when the checkpoint has one of the right shape."""
    own = model.state_dict()
    sd = dict(sd)
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], own["pos_embed"].shape[1] - 1)
    head_fits = all(k in sd and sd[k].shape == own[k].shape for k in ("head.weight", "head.bias"))
    if not head_fits:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    missing = [k for k in own if k not in sd and not k.startswith("head.")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError("checkpoint does not fit the ViT:"
                         + (f"\n  missing ({len(missing)}): {missing[:8]}" if missing else "")
                         + (f"\n  unexpected ({len(unexpected)}): {unexpected[:8]}" if unexpected else "")
                         + (f"\n  shape mismatch ({len(mismatched)}): {mismatched[:8]}" if mismatched else ""))
    model.load_state_dict(sd, strict=False)
    return head_fits


def _read_tensors(path):
    """A state dict, or a fine-tune's saved adapter as {"args", "config", ..., "adapter", "head"}."""
    if path.endswith(".safetensors"):
        header, sd = read_safetensors(path)  # a run's adapter.safetensors has its flags and config in the header
        if header is None:
            return sd
        return dict(header, adapter={k: v for k, v in sd.items() if not k.startswith("head.")},
                    head={k[5:]: v for k, v in sd.items() if k.startswith("head.")})
    return torch.load(path, map_location="cpu", weights_only=True)


def _from_finetune(blob, path):
    """A full fine-tune's saved adapter as a checkpoint: its backbone and head, and its own n_head."""
    method = blob["args"].get("method")
    if method != "full":
        raise SystemExit(f"error: --init_from {path}: the adapter of a --method {method} run holds "
                         f"no backbone; rebuild it with load_finetuned({path!r}), or start from a full fine-tune")
    cfg = blob.get("config") or {"n_head": blob["args"].get("n_head"), "ln_eps": 1e-12}
    sd = {**blob["adapter"], **{f"head.{k}": v for k, v in blob.get("head", {}).items()}}
    return sd, {"num_attention_heads": cfg["n_head"], "layer_norm_eps": cfg["ln_eps"], "hidden_act": "gelu",
                "classes": blob.get("classes")}


def hub_checkpoint(repo, init_from, online):
    """(config.json, weights file) of a Hub model: the Hugging Face cache first, then a download."""
    from huggingface_hub import hf_hub_download
    local = ("pass --init_from PATH (a .safetensors/.bin file, or a folder holding it and config.json, "
             "downloaded elsewhere) or --init_from scratch")
    for cached in (True, False):
        if not cached and not online():
            raise Missing(f"the ViT {repo} (--init_from {init_from}; not in the Hugging Face cache): {local}")
        try:
            cfg_path = hf_hub_download(repo, "config.json", local_files_only=cached)
            try:
                return cfg_path, hf_hub_download(repo, "model.safetensors", local_files_only=cached)
            except Exception as e:
                if unreachable(e):
                    raise
                return cfg_path, hf_hub_download(repo, "pytorch_model.bin", local_files_only=cached)
        except Exception as e:
            if cached:
                continue  # not in the cache
            if unreachable(e):
                raise Missing(f"the ViT {repo} (--init_from {init_from}; the download broke off: {why(e)}): {local}")
            raise SystemExit(f"error: could not fetch {repo} (--init_from {init_from}; config.json + "
                             f"model.safetensors or pytorch_model.bin) from the Hugging Face Hub: {why(e)}; {local}")


def read_checkpoint(init_from, online=lambda: True):
    """-> (state dict in our naming, HF config dict or None), from a file, a folder or the Hub."""
    hf_cfg = None
    if os.path.isdir(init_from):
        names = sorted(os.listdir(init_from))
        weights = [n for n in ("model.safetensors", "pytorch_model.bin") if n in names] or \
                  [n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".pth"))]
        if not weights:
            raise SystemExit(f"error: --init_from {init_from}: no weights (.safetensors/.bin/.pt) in this folder")
        path = os.path.join(init_from, weights[0])
        cfg_path = os.path.join(init_from, "config.json")
    elif os.path.isfile(init_from):
        path, cfg_path = init_from, os.path.join(os.path.dirname(init_from), "config.json")
    else:
        cfg_path, path = hub_checkpoint(HUB_MODELS.get(init_from, init_from), init_from, online)
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            hf_cfg = json.load(f)
    try:
        sd = _read_tensors(path)
    except Exception as e:
        raise SystemExit(f"error: --init_from {path}: not a readable checkpoint (truncated, or not a "
                         f"safetensors/torch file): {why(e)}")
    if isinstance(sd, dict) and "adapter" in sd and "args" in sd:
        sd, hf_cfg = _from_finetune(sd, path)
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise SystemExit(f"error: --init_from {path}: not a state dict of tensors")
    if any(k.endswith("embeddings.cls_token") for k in sd):
        sd = hf_to_vit(sd)
    return sd, hf_cfg


def build_model(args, num_classes, weights=None, n_head=None, classes=None):
    """ViT from --init_from (scratch, a Hub id/alias, or a local path), with a fresh head. weights: what
    read_checkpoint returned, when main() has read it already; n_head: a saved model's own count; classes:
    the data's class names (a fine-tune's head is kept only when it was trained on the same ones)."""
    if args.init_from == "scratch":
        return ViT(ViTConfig(args.image_size, args.patch_size, args.n_layer, n_head or args.n_head, args.n_embd,
                             4 * args.n_embd, num_classes))
    sd, hf_cfg = weights or read_checkpoint(args.init_from)
    if "cls_token" not in sd or "patch_embed.weight" not in sd:
        raise SystemExit(f"error: --init_from {args.init_from}: not a ViT checkpoint (no class token / patch "
                         f"embedding); some keys: {list(sd)[:6]}")
    n_embd, patch = sd["cls_token"].shape[-1], sd["patch_embed.weight"].shape[-1]
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if hf_cfg and hf_cfg.get("hidden_act", "gelu") != "gelu":
        raise SystemExit(f"error: --init_from {args.init_from}: hidden_act={hf_cfg['hidden_act']!r}, this ViT "
                         f"has exact GELU only")
    if n_head is None and hf_cfg and "num_attention_heads" in hf_cfg:
        n_head = hf_cfg["num_attention_heads"]
    elif n_head is None:
        n_head = n_embd // 64
        print(f"no config.json beside {args.init_from}: assuming {n_head} heads of 64 (every Google ViT)")
    eps = hf_cfg.get("layer_norm_eps", 1e-12) if hf_cfg else 1e-12
    if classes is not None and hf_cfg and hf_cfg.get("classes") is not None and \
            list(hf_cfg["classes"]) != list(classes):  # another task's classifier: start the head fresh
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    cfg = ViTConfig(args.image_size, patch, n_layer, n_head, n_embd, sd["blocks.0.mlp.fc1.weight"].shape[0],
                    num_classes, eps)
    model = ViT(cfg)
    try:
        head = load_weights(model, sd)
    except ValueError as e:
        raise SystemExit(f"error: --init_from {args.init_from}: {e}")
    print(f"loaded {args.init_from}: {n_layer} layers, n_embd {n_embd}, {n_head} heads, patch {patch}"
          f"{', its classifier as the head' if head else ''}")
    return model
