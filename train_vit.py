"""Fine-tune a ViT for image classification with any nanopeft method (SPEC §10; papers: siva §4.1, sera §4.1).

    python train_vit.py --method siva --dataset cifar10                        # ViT-B/16 in21k, 10 epochs
    python train_vit.py --method lora --init_from vit-large --dataset pets
    python train_vit.py --method bone --init_from scratch --n_layer 2 --n_embd 256 --n_head 4 --patch_size 4 \
        --image_size 32 --data cifar10.npz --max_iters 10   # offline: an .npz or a folder
    torchrun --standalone --nproc_per_node=4 train_vit.py --method lora --dataset cifar10   # 4 GPUs, DDP

Model: a compact pre-norm ViT (class token, learned position embeddings, q/k/v as separate Linears named
attn.q_proj / attn.k_proj / attn.v_proj so methods target them as the papers count them, attn.out_proj,
mlp.fc1 / mlp.fc2, final norm, head), attention by F.scaled_dot_product_attention. Every Linear is
called as a module (never through its .weight), so an adapter swapped in for it is always used.

Choices made where the papers and SPEC are silent:
- Checkpoints: Google's ImageNet-21k ViTs in Hugging Face's layout (`--init_from vit-base` =
  google/vit-base-patch16-224-in21k, `vit-large` = google/vit-large-patch16-224-in21k, or any repo id
  with that layout), fetched with huggingface_hub and copied key for key with shape checks; no
  transformers at run time. Their pooler (the in21k pre-logits layer) is dropped: the head reads the
  class token after the final norm, as HF's ViTForImageClassification does. Position embeddings are
  interpolated (bicubic) when --image_size gives another patch grid than the checkpoint's. A full
  fine-tune's adapter.pt is a checkpoint too (its saved n_head is used; its head only when its class
  names are the data's, else the head starts fresh).
- --classes 0-4 (or 5,6,7,8,9, or a mix: 0-2,7): train and test on those classes only, relabelled
  0..C-1 in the order given, their names kept (pretrain on some classes, adapt to others).
- The head is new, zero-initialised (as in the ViT paper's fine-tuning) and always trained, at its own
  --head_lr. `--method head` is the papers' linear probe (LP); `--method none` trains nothing and
  only evaluates --init_from (useful when its classifier fits the classes); to evaluate a fine-tuned
  run, rebuild it with load_finetuned(path to its adapter.pt).
- Per-method defaults for ViT. From the papers' text: targets q_proj, v_proj (siva §4.1, sera §4.1);
  LoRA r=16 and SiVA perc=0.95 (siva §4.1, ViT-B/L); SeRA r=16 with split = r (sera §4.1, ViT-L "easy"
  mode; split = r is its stated default); Bone b=64 (its paper's default). Ours: LoRA and SeRA
  alpha=16 (scale 1); SiVA's "variance" read as Σσ² with k >= 1 (siva.py); VB-LoRA r=4, h=256, k=2
  with b=256 (its GPT-2 setting; b must divide the width: 256 divides 768 and 1024). Learning rates
  are not in our copies of the papers; the --lr defaults per method are untuned starting points.
  VB-LoRA: bank at --vblora_bank_lr, logits at --vblora_logits_lr, no weight decay on either (its paper).
- Data: Hub datasets through `datasets` (ids in DATASETS below; FGVC-Aircraft from the parquet
  conversion of HuggingFaceM4/FGVC-Aircraft, pinned to its commit, as datasets>=4 runs no loading
  scripts), or a local .npz / image folder (layout in DATA_LAYOUT), checked before any training.
  Images are decoded once into a uint8 tensor cache (kept at their own size when the first 32 share
  one square size no larger than --image_size, else resized once to --image_size), and augmented on the
  device in batches: random-resized-crop (area U(--min_crop, 1), aspect log-U(3/4, 4/3), the box
  clipped to the image) + horizontal flip as one affine grid_sample; so crops only ever upsample.
  The crop and flip of a micro-batch are drawn from a generator seeded by (--seed, its index), so they
  do not depend on the number of processes and a resumed run draws them again as it would have.
  Test images are resized (bilinear, antialiased) to --image_size, no crop. Normalisation
  mean = std = 0.5, what Google's in21k checkpoints expect.
- AdamW, linear warmup then cosine decay to 0, gradient clipping; bf16 autocast on CUDA. An epoch is
  len(train) // (global batch) steps: the last incomplete global batch is dropped (another each epoch).
- Multi-GPU (torchrun): DistributedDataParallel as nanoGPT's train.py. One optimizer step takes
  --grad_accum micro-batches of --batch_size on each of the N processes; micro-batch i of a step goes to
  process i % N, so N processes with --grad_accum G give the same steps as one with --grad_accum G*N.
  Only rank 0 logs, evaluates and saves.
- adapter.pt holds the method's adapter state dict (the whole backbone for `full`, compact top-k for
  VB-LoRA), the head, the model's config and the run's arguments; load_finetuned(path) rebuilds the
  model from it (a scratch backbone is rebuilt from --seed). ckpt.pt holds every trainable tensor, the
  optimiser, the step and the torch RNG state (dropout), for --resume. Both are written atomically.
"""
import argparse
import itertools
import json
import math
import os
import re
import sys
import time
import zipfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import bone
import lora
import sera
import siva
import vblora
from resources import Missing, fetch_all

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
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _unreachable(e):
    """True when e, or an exception it was raised from, is a failed connection or a timeout (the
    requests, httpx and huggingface_hub ones included, by their class names)."""
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError)) or re.search("Connect|Timeout|Offline", type(e).__name__):
            return True
        e = e.__cause__ or e.__context__
    return False


def _why(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _from_finetune(blob, path):
    """A full fine-tune's adapter.pt as a checkpoint: its backbone and head, and its own n_head."""
    if blob.get("method") != "full":
        raise SystemExit(f"error: --init_from {path}: the adapter.pt of a --method {blob.get('method')} run holds "
                         f"no backbone; rebuild it with load_finetuned({path!r}), or start from a full fine-tune")
    cfg = blob.get("model_cfg") or {"n_head": blob["args"].get("n_head"), "ln_eps": 1e-12}
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
                if _unreachable(e):
                    raise
                return cfg_path, hf_hub_download(repo, "pytorch_model.bin", local_files_only=cached)
        except Exception as e:
            if cached:
                continue  # not in the cache
            if _unreachable(e):
                raise Missing(f"the ViT {repo} (--init_from {init_from}; the download broke off: {_why(e)}): {local}")
            raise SystemExit(f"error: could not fetch {repo} (--init_from {init_from}; config.json + "
                             f"model.safetensors or pytorch_model.bin) from the Hugging Face Hub: {_why(e)}; {local}")


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
                         f"safetensors/torch file): {_why(e)}")
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


# -----------------------------------------------------------------------------
# data

DATASETS = {  # --dataset: (Hugging Face Hub id, label column, revision); test = the "test" split
    "cifar10": ("uoft-cs/cifar10", "label", None),
    "cifar100": ("uoft-cs/cifar100", "fine_label", None),
    "pets": ("timm/oxford-iiit-pet", "label", None),
    "cars": ("tanganke/stanford_cars", "label", None),
    "eurosat": ("timm/eurosat-rgb", "label", None),
    # main still holds a loading script, which datasets>=4 refuses; this commit (the repo's PR #1,
    # refs/pr/1) is its parquet conversion, with the same train/validation/test splits
    "fgvc": ("HuggingFaceM4/FGVC-Aircraft", "variant", "e18a7c97147c90dc7f4a60d74a7f4258e9264e97"),
    "resisc45": ("timm/resisc45", "label", None),
}
DATA_LAYOUT = ("a .npz holding x_train, y_train, x_test, y_test (uint8 (N, H, W, 3) images, integer labels "
               "0..C-1) and optionally class_names (C names), or a folder holding train/<class>/ and "
               "test/<class>/ with the images of each class")
MEAN, STD = 0.5, 0.5  # Google's in21k preprocessing: pixels to [-1, 1]
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _pil_to_chw(img):
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)  # (3, H, W) uint8


def cache_images(images, n, size):
    """n images ((3, H, W) uint8 tensors from an iterable) -> (n, 3, c, c) uint8, decoded once.
    c is the images' own side when the first few are one square size <= size, else size (resized
    once, antialiased), so the cache never holds more pixels than the model sees."""
    it = iter(images)
    head = [next(it) for _ in range(min(n, 32))]
    sides = {tuple(t.shape[1:]) for t in head}
    c = head[0].shape[1] if len(sides) == 1 and head[0].shape[1] == head[0].shape[2] <= size else size
    out = torch.empty(n, 3, c, c, dtype=torch.uint8)
    for i, t in enumerate(itertools.chain(head, it)):
        if t.shape[1:] != (c, c):
            t = F.interpolate(t[None].float(), size=(c, c), mode="bilinear", antialias=True, align_corners=False)
            t = t[0].round().clamp(0, 255).to(torch.uint8)
        out[i] = t
    return out


def check_split(where, split, n_x, y, classes):
    """Images and labels agree in number, the split is not empty, labels are 0..len(classes)-1."""
    if n_x != len(y):
        raise SystemExit(f"error: {where}: x_{split} holds {n_x} images but y_{split} {len(y)} labels")
    if n_x == 0:
        raise SystemExit(f"error: {where}: the {split} split is empty")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= len(classes):
        raise SystemExit(f"error: {where}: y_{split} holds labels {lo}..{hi}, but there are {len(classes)} classes "
                         f"(labels must be 0..{len(classes) - 1})")


def load_npz(path, size):
    """.npz with x_train, y_train, x_test, y_test (uint8 (N, H, W, 3)) and optionally class_names."""
    where = f"--data {path}"
    try:
        d = np.load(path, allow_pickle=False)
    except Exception as e:
        raise SystemExit(f"error: {where}: not a readable .npz: {_why(e)}")
    if not isinstance(d, np.lib.npyio.NpzFile):
        raise SystemExit(f"error: {where}: one array, not an .npz archive; expected {DATA_LAYOUT}")
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in d.files]
    if missing:
        raise SystemExit(f"error: {where}: missing {', '.join(missing)} (it holds {', '.join(d.files) or 'nothing'})")
    ys = {s: d[f"y_{s}"] for s in ("train", "test")}
    for s, y in ys.items():
        if y.ndim != 1 or y.dtype.kind not in "iub":
            raise SystemExit(f"error: {where}: y_{s} must be a 1-D array of integer labels, got {y.dtype} {y.shape}")
    classes = [str(c) for c in d["class_names"]] if "class_names" in d.files else \
        [str(i) for i in range(int(max(y.max(initial=0) for y in ys.values())) + 1)]
    out = {"classes": classes}
    for split in ("train", "test"):
        x = d[f"x_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise SystemExit(f"error: {where}: x_{split} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
        check_split(where, split, len(x), ys[split], classes)
        x = torch.from_numpy(x).permute(0, 3, 1, 2)  # (N, 3, H, W)
        square_small = x.shape[2] == x.shape[3] <= size
        out[f"x_{split}"] = x.contiguous() if square_small else cache_images(x, len(x), size)
        out[f"y_{split}"] = torch.from_numpy(ys[split].astype(np.int64))
    return out


def load_folder(path, size):
    """path/train/<class>/*.png|jpg... and path/test/<class>/...; classes = train's subfolders, sorted.
    Hidden entries (.ipynb_checkpoints/, .DS_Store) are neither classes nor images."""
    from PIL import Image
    where = f"--data {path}"
    visible = lambda root, dirs: sorted(e.name for e in os.scandir(root)
                                        if not e.name.startswith(".") and e.is_dir() == dirs)
    absent = [s + "/" for s in ("train", "test") if not os.path.isdir(os.path.join(path, s))]
    if absent:
        raise SystemExit(f"error: {where}: no {' and no '.join(absent)} in this folder; expected {DATA_LAYOUT}")
    classes = visible(os.path.join(path, "train"), dirs=True)
    out = {"classes": classes}
    for split in ("train", "test"):
        root = os.path.join(path, split)
        if not visible(root, dirs=True):
            raise SystemExit(f"error: {where}: {split}/ holds no class subfolders (a flat folder of images?); "
                             f"expected {DATA_LAYOUT}")
        files = []
        for c in visible(root, dirs=True):
            if c not in classes:
                raise SystemExit(f"error: {where}: {split}/{c} is not a class of train/ ({', '.join(classes)})")
            files += [(os.path.join(root, c, f), classes.index(c)) for f in visible(os.path.join(root, c), dirs=False)
                      if f.lower().endswith(IMAGE_EXT)]
        check_split(where, split, len(files), torch.tensor([y for _, y in files], dtype=torch.int64), classes)

        def decode(fs=files):
            for f, _ in fs:
                with Image.open(f) as img:
                    yield _pil_to_chw(img)
        out[f"x_{split}"] = cache_images(decode(), len(files), size)
        out[f"y_{split}"] = torch.tensor([y for _, y in files], dtype=torch.int64)
    return out


def load_hub(name, size, online=lambda: True):
    repo, label, revision = DATASETS[name]
    local = f"pass --data PATH: {DATA_LAYOUT}"
    if not online():  # `datasets` would retry for a minute before it gave up
        raise Missing(f"the dataset {repo} (--dataset {name}; the Hugging Face Hub): {local}")
    try:
        import datasets
        ds = datasets.load_dataset(repo, revision=revision)
    except Exception as e:
        if _unreachable(e):
            raise Missing(f"the dataset {repo} (--dataset {name}; the download broke off: {_why(e)}): {local}")
        raise SystemExit(f"error: could not load the dataset {repo} (--dataset {name}) through `datasets`: "
                         f"{_why(e)}; {local}")
    feats = ds["train"].features
    image = next(k for k, f in feats.items() if isinstance(f, datasets.Image))
    if label not in feats:
        label = next(k for k, f in feats.items() if isinstance(f, datasets.ClassLabel))
    out = {"classes": list(feats[label].names) if isinstance(feats[label], datasets.ClassLabel) else None}
    for split, src in (("train", "train"), ("test", "test" if "test" in ds else "validation")):
        d = ds[src]
        out[f"y_{split}"] = torch.tensor(list(d[label]), dtype=torch.int64)
        if out["classes"] is None:
            out["classes"] = [str(i) for i in range(int(out["y_train"].max()) + 1)]
        check_split(f"--dataset {name}", split, len(d), out[f"y_{split}"], out["classes"])
        pixels = (_pil_to_chw(ex[image]) for ex in d.select_columns([image]))  # decode no other column
        out[f"x_{split}"] = cache_images(pixels, len(d), size)
    return out


def load_data(args, online=lambda: True):
    """{x_train, y_train, x_test, y_test, classes} from --data (a folder, or an .npz read by its content
    whatever its name) or else the Hub's --dataset; every problem is one `error:` line."""
    if not args.data:
        data = load_hub(args.dataset, args.image_size, online)
    elif os.path.isdir(args.data):
        data = load_folder(args.data, args.image_size)
    elif not os.path.isfile(args.data):
        raise SystemExit(f"error: --data {args.data}: no such file or folder")
    elif not zipfile.is_zipfile(args.data):  # an .npz is a zip archive, whatever its suffix
        raise SystemExit(f"error: --data {args.data}: neither an .npz archive nor a folder; expected {DATA_LAYOUT}")
    else:
        data = load_npz(args.data, args.image_size)
    if args.classes:
        data = select_classes(data, parse_classes(args.classes), f"--data {args.data}" if args.data else
                              f"--dataset {args.dataset}")
    return data


def parse_classes(spec):
    """'0-2,7' -> [0, 1, 2, 7]; ValueError for anything else (a bad item, an empty range, a repeat)."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise ValueError(f"{item!r} is not an index or a range lo-hi (e.g. 0-4 or 5,6,7)")
        out += range(int(m[1]), int(m[2] or m[1]) + 1)
    if len(set(out)) != len(out):
        raise ValueError("a class is listed twice")
    return out


def select_classes(data, keep, where):
    """Only the classes `keep` (indices into data["classes"]), relabelled 0..len(keep)-1 in that order."""
    n = len(data["classes"])
    if max(keep) >= n:
        raise SystemExit(f"error: --classes: {where} has {n} classes (0..{n - 1}), not {max(keep)}")
    out = {"classes": [data["classes"][c] for c in keep]}
    new = torch.full((n,), -1, dtype=torch.int64)
    new[keep] = torch.arange(len(keep))  # old label -> new label, -1 = dropped
    for split in ("train", "test"):
        y = new[data[f"y_{split}"]]
        out[f"x_{split}"], out[f"y_{split}"] = data[f"x_{split}"][y >= 0], y[y >= 0]
        if len(out[f"y_{split}"]) == 0:
            raise SystemExit(f"error: --classes {','.join(map(str, keep))}: no {split} image in {where}")
    return out


def random_resized_crop_flip(x, size, min_scale=0.08, ratio=(3 / 4, 4 / 3), flip=True, generator=None):
    """(B, 3, H, W) float -> (B, 3, size, size): one random box per image (area fraction U(min_scale, 1),
    aspect log-uniform in ratio, clipped to the image), mirrored with probability 1/2, all sampled
    bilinearly by a single grid_sample. The draws come from `generator` (a CPU one; None: the global)."""
    B = x.shape[0]
    u = torch.rand(5, B, generator=generator).to(x.device)  # area, aspect, centre x, centre y, flip
    area = min_scale + (1 - min_scale) * u[0]
    aspect = (math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]).exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # box sides as fractions of the image side
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (u[2] * (1 - w) + w / 2) * 2 - 1  # box centre in grid_sample's [-1, 1]
    cy = (u[3] * (1 - h) + h / 2) * 2 - 1
    sign = torch.where(u[4] < 0.5, -1.0, 1.0) if flip else torch.ones_like(w)
    theta = torch.zeros(B, 2, 3, device=x.device)  # output [-1, 1] coords -> input coords
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = F.affine_grid(theta, (B, 3, size, size), align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(x, size, train, min_scale=0.08, generator=None):
    """uint8 (B, 3, H, W) on the device -> normalised float (B, 3, size, size)."""
    x = x.float() / 255
    if train:
        x = random_resized_crop_flip(x, size, min_scale, generator=generator)
    elif x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - MEAN) / STD


# -----------------------------------------------------------------------------
# methods: name -> (Config from args, apply, adapter state dict, load)

METHODS = {
    "lora": (lambda a: lora.LoRAConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout),
             lora.apply_lora, lora.lora_state_dict, lora.load_lora_state_dict),
    "sera": (lambda a: sera.SeRAConfig(r=a.sera_r, split=a.sera_split or a.sera_r, alpha=a.sera_alpha,
                                       dropout=a.sera_dropout),
             sera.apply_sera, sera.sera_state_dict, sera.load_sera_state_dict),
    "siva": (lambda a: siva.SiVAConfig(perc=a.siva_perc),
             siva.apply_siva, siva.siva_state_dict, siva.load_siva_state_dict),
    "bone": (lambda a: bone.BoneConfig(b=a.bone_b, grouping=a.bone_grouping),
             bone.apply_bone, bone.bone_state_dict, bone.load_bone_state_dict),
    "vblora": (lambda a: vblora.VBLoRAConfig(r=a.vblora_r, b=a.vblora_b, h=a.vblora_h, k=a.vblora_k),
               vblora.apply_vblora, lambda m: vblora.vblora_state_dict(m, compact=True),
               vblora.load_vblora_state_dict),
}
ALL_METHODS = ["none", "full", "head", *METHODS]
# --lr defaults: the papers' ViT lr tables are missing from our copies; untuned starting points (VB-LoRA: the
# bank's, unless --vblora_bank_lr)
METHOD_LR = {"none": 0.0, "full": 2e-5, "head": 0.0, "lora": 5e-3, "sera": 5e-3, "siva": 5e-3, "bone": 1e-4,
             "vblora": 1e-3}


def apply_method(model, args):
    """Set what trains: everything (full), the head only (head), nothing (none), or the method's adapter
    on --targets plus the head. Returns the AdamW parameter groups (each named, with its base_lr): head at
    --head_lr, VB-LoRA bank at --vblora_bank_lr and logits at --vblora_logits_lr, the rest (adapter, or
    the backbone for full) at --lr; weight decay on matrices only and never on VB-LoRA's tensors."""
    model.requires_grad_(args.method == "full")
    if args.method in METHODS:
        make_cfg, apply, _, _ = METHODS[args.method]
        apply(model, make_cfg(args), args.targets.split(","))
    model.head.requires_grad_(args.method != "none")
    lrs = {"head": args.head_lr, "logits": args.vblora_logits_lr, "bank": args.vblora_bank_lr}
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = "head" if n.startswith("head.") else "logits" if "vblora_logits" in n else "bank" \
            if "vblora_bank" in n else "backbone" if args.method == "full" else "adapter"
        wd = args.weight_decay if p.dim() >= 2 and "vblora" not in n else 0.0
        groups.setdefault((name, wd), []).append(p)
    return [{"params": ps, "name": name, "lr": lrs.get(name, args.lr), "base_lr": lrs.get(name, args.lr),
             "weight_decay": wd} for (name, wd), ps in groups.items()]


def adapter_state_dict(model, method):
    """What a user ships, without the head: the method's adapter (VB-LoRA compact), the backbone (full)."""
    if method == "full":
        return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    return METHODS[method][2](model) if method in METHODS else {}


def stored_param_count(model, method):
    if method == "vblora":
        return vblora.vblora_stored_param_count(model)
    return sum(t.numel() for t in adapter_state_dict(model, method).values())


def lr_factor(step, warmup, total):
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# -----------------------------------------------------------------------------
# checkpoints

def save_atomic(obj, path):
    """Write path + '.tmp', flush it to the disk, rename it over path, then flush the folder: a crash
    leaves the old file or the new one, never a torn one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CKPT_KEYS = ("args", "step", "trainable", "optimizer", "rng")
ADAPTER_KEYS = ("args", "method", "adapter", "head", "classes")


def load_checkpoint(path, keys=CKPT_KEYS):
    """torch.load(path) as data only; an empty, truncated or foreign file is one `error:` line."""
    if os.path.getsize(path) == 0:
        raise SystemExit(f"error: {path} is an empty file, not a checkpoint (a save cut short?)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} is not a readable checkpoint (truncated or not a torch file): {_why(e)}")
    missing = [k for k in keys if k not in ck] if isinstance(ck, dict) else list(keys)
    if missing:
        raise SystemExit(f"error: {path} is not a checkpoint of train_vit.py: no {', '.join(missing)}")
    return ck


# flags that cannot change what a resumed run computes, only how long it runs, what it prints, where it saves
RESUME_MAY_CHANGE = ("max_iters", "epochs", "log_interval", "eval_interval", "eval_batch_size", "device",
                     "compile", "resume", "overwrite", "out_dir")


def check_resume(saved_args, args):
    """Refuse a --resume whose flags alter the run (a new --seed rebuilds a scratch backbone, a new --lr
    another schedule...): one line naming every changed flag with both values."""
    new = vars(args)
    changed = [k for k in sorted(set(saved_args) | set(new)) if k not in RESUME_MAY_CHANGE
               and saved_args.get(k, "(absent)") != new.get(k, "(absent)")]
    if changed:
        raise SystemExit("error: --resume: these flags differ from the checkpoint's and would alter the run: "
                         + ", ".join(f"--{k} {saved_args.get(k, '(absent)')} (now {new.get(k, '(absent)')})"
                                     for k in changed)
                         + "; only " + ", ".join("--" + k for k in RESUME_MAY_CHANGE) + " may change")


def load_finetuned(path, device="cpu"):
    """Rebuild a fine-tuned model from adapter.pt: a full fine-tune from its saved config and tensors;
    else the backbone from its --init_from (or --seed for scratch) with its saved n_head, the method
    applied as in training, then the adapter and the head loaded."""
    blob = load_checkpoint(path, ADAPTER_KEYS)
    args = argparse.Namespace(**blob["args"])
    saved_cfg = blob.get("model_cfg")
    torch.manual_seed(args.seed)
    if args.method == "full" and saved_cfg:
        model = ViT(ViTConfig(**saved_cfg))
        model.load_state_dict({**blob["adapter"], **{f"head.{k}": v for k, v in blob["head"].items()}})
        return model.to(device).eval()
    model = build_model(args, len(blob["classes"]), n_head=saved_cfg and saved_cfg["n_head"])
    apply_method(model, args)
    if args.method == "full":
        model.load_state_dict(blob["adapter"], strict=False)
    elif args.method in METHODS:
        METHODS[args.method][3](model, blob["adapter"])
    model.head.load_state_dict(blob["head"])
    return model.to(device).eval()


def hms(seconds):
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# -----------------------------------------------------------------------------
# arguments


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--init_from", default="vit-base",
                   help="vit-base | vit-large (Google in21k on the Hub) | a Hub repo id | a local .safetensors/.bin/"
                        ".pt or folder | a full fine-tune's adapter.pt | scratch")
    g.add_argument("--image_size", type=int, default=224, help="model input side; pos-embeds interpolated if needed")
    g.add_argument("--n_layer", type=int, default=12, help="scratch only: blocks")
    g.add_argument("--n_head", type=int, default=12, help="scratch only: attention heads; must divide --n_embd")
    g.add_argument("--n_embd", type=int, default=768, help="scratch only: width")
    g.add_argument("--patch_size", type=int, default=16, help="scratch only: patch side; must divide --image_size")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=list(DATASETS), help="Hub dataset (see DATASETS)")
    g.add_argument("--data", default="", help=f"local data instead: {DATA_LAYOUT}")
    g.add_argument("--min_crop", type=float, default=0.08, help="smallest random-resized-crop area fraction")
    g.add_argument("--classes", default="", help="train and test on these class indices only, relabelled 0..C-1 "
                   "in this order, e.g. 0-4 or 5,6,7,8,9 (default: all)")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="lora", choices=ALL_METHODS,
                   help="none = evaluate only; head = linear probe; full = every weight; else the adapter")
    g.add_argument("--targets", default="q_proj,v_proj", help="comma-separated Linear names to adapt (both papers)")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank (siva §4.1 ViT setting)")
    g.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scale = alpha / r (16: ours)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout on x")
    g.add_argument("--sera_r", type=int, default=16, help="SeRA mixing width r (sera §4.1, ViT-L easy mode)")
    g.add_argument("--sera_split", type=int, default=None, help="SeRA segments; None = --sera_r (its default)")
    g.add_argument("--sera_alpha", type=float, default=16.0, help="SeRA scale = alpha / r (16: ours)")
    g.add_argument("--sera_dropout", type=float, default=0.0, help="SeRA dropout on x (the paper uses none)")
    g.add_argument("--siva_perc", type=float, default=0.95,
                   help="SiVA variance kept frozen (siva §4.1); variance read as Σσ², k >= 1: ours")
    g.add_argument("--bone_b", type=int, default=64, help="Bone block size; must divide in and out")
    g.add_argument("--bone_grouping", default="col", choices=["col", "row"],
                   help="Bone-col (its paper's default) or Bone-row")
    g.add_argument("--vblora_r", type=int, default=4, help="VB-LoRA rank")
    g.add_argument("--vblora_b", type=int, default=256, help="vector length; must divide the width")
    g.add_argument("--vblora_h", type=int, default=256, help="vectors in the bank")
    g.add_argument("--vblora_k", type=int, default=2, help="top-k vectors per sub-vector")
    g.add_argument("--vblora_bank_lr", type=float, default=None, help="VB-LoRA bank lr; None = --lr")
    g.add_argument("--vblora_logits_lr", type=float, default=1e-2, help="VB-LoRA logits lr (its paper)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10, help="the papers train at most 10")
    g.add_argument("--max_iters", type=int, default=0, help="stop after this many steps (0: run --epochs)")
    g.add_argument("--batch_size", type=int, default=64, help="training images per micro-batch, per process")
    g.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches per optimizer step, per process: a step sees batch_size * grad_accum * "
                        "processes images; N processes with G give the steps of 1 process with G*N")
    g.add_argument("--eval_batch_size", type=int, default=256, help="test images per forward")
    g.add_argument("--lr", type=float, default=None,
                   help="adapter lr (backbone lr for full); None = per method: "
                        + ", ".join(f"{k} {v:g}" for k, v in METHOD_LR.items() if v))
    g.add_argument("--head_lr", type=float, default=5e-3, help="lr of the classification head, every method")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="on matrices, not on biases/norms/VB-LoRA")
    g.add_argument("--warmup_frac", type=float, default=0.1, help="fraction of the steps spent in linear warmup")
    g.add_argument("--grad_clip", type=float, default=1.0, help="0 disables")
    g.add_argument("--seed", type=int, default=0, help="scratch init, adapter init, data order and augmentation")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (bf16 autocast) or cpu; under torchrun each process takes cuda:LOCAL_RANK")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--log_interval", type=int, default=20, help="steps between log lines")
    g.add_argument("--eval_interval", type=int, default=0,
                   help="steps between test evaluations (and saves); 0: at each epoch's end. Always at the end")
    g.add_argument("--out_dir", default="out-vit", help="adapter.pt and ckpt.pt go here")
    g.add_argument("--resume", action="store_true",
                   help="continue from out_dir/ckpt.pt; only " + ", ".join("--" + k for k in RESUME_MAY_CHANGE[:6])
                        + " may differ from its run")
    g.add_argument("--overwrite", action="store_true", help="start over even if out_dir holds a run")
    args = p.parse_args(argv)
    check_args(args)
    if args.lr is None:
        args.lr = METHOD_LR[args.method]
    if args.vblora_bank_lr is None:
        args.vblora_bank_lr = args.lr
    return args


def check_args(args):
    """Every bad flag, one `error:` line each, before anything is loaded."""
    bad = [f"--{k} {getattr(args, k)} must be >= 1" for k in
           ("batch_size", "grad_accum", "eval_batch_size", "log_interval", "epochs", "image_size", "patch_size",
            "n_layer", "n_head", "n_embd") if getattr(args, k) < 1]
    bad += [f"--{k} {getattr(args, k)} must be >= 0" for k in
            ("max_iters", "eval_interval", "lr", "head_lr", "vblora_bank_lr", "vblora_logits_lr", "weight_decay",
             "grad_clip") if getattr(args, k) is not None and getattr(args, k) < 0]
    if args.n_head >= 1 and args.n_embd % args.n_head:
        bad.append(f"--n_head {args.n_head} must divide --n_embd {args.n_embd}")
    if args.patch_size >= 1 and args.image_size % args.patch_size:
        bad.append(f"--patch_size {args.patch_size} must divide --image_size {args.image_size}")
    if not 0 < args.min_crop <= 1:
        bad.append(f"--min_crop {args.min_crop} must lie in (0, 1]")
    if not 0 <= args.warmup_frac < 1:
        bad.append(f"--warmup_frac {args.warmup_frac} must lie in [0, 1)")
    if args.resume and args.overwrite:
        bad.append("--resume and --overwrite: pass one, continue the run or start over")
    if args.classes:
        try:
            parse_classes(args.classes)
        except ValueError as e:
            bad.append(f"--classes {args.classes}: {e}")
    if args.method in METHODS:
        try:
            METHODS[args.method][0](args)  # the method's own checks on its flags
        except ValueError as e:
            bad.append(f"--method {args.method}: {e}")
    if bad:
        raise SystemExit("\n".join("error: " + b for b in bad))


# -----------------------------------------------------------------------------
# distributed (nanoGPT's train.py pattern)


def setup_ddp(args):
    """-> (ddp, rank, world_size, device). Under torchrun (RANK set) join the process group: nccl on
    CUDA, each process on cuda:LOCAL_RANK; gloo on CPU."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, args.device
    cuda = args.device.startswith("cuda")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return True, rank, world_size, device


@torch.no_grad()
def evaluate(model, x, y, args, ctx):
    model.eval()
    correct = 0
    for i in range(0, len(x), args.eval_batch_size):
        xb = preprocess(x[i:i + args.eval_batch_size], args.image_size, train=False)
        with ctx:
            correct += (model(xb).argmax(-1) == y[i:i + args.eval_batch_size]).sum().item()
    model.train()
    return correct / len(x)


def fetch_inputs(args, ddp, master):
    """The base weights and the data (resources.fetch_all: one probe of the network, every input tried
    before any is reported, one message naming all that is missing). Under DDP rank 0 downloads first;
    the others then read its cache."""
    if ddp and not master:
        dist.barrier()
    got = fetch_all({"weights": lambda online: None if args.init_from == "scratch" else
                     read_checkpoint(args.init_from, online),
                     "data": lambda online: load_data(args, online)})
    if ddp and master:
        dist.barrier()
    return got["weights"], got["data"]


# -----------------------------------------------------------------------------
# training


def main(argv=None):
    """The script; returns {model, test_acc, step, n_trainable (without the head), n_head, n_stored, train_loss
    (the last logged), curve [(step, loss)] per log line, train_time (s, evaluation excluded), img_per_s} for
    tests, notebooks and reproduce.py."""
    args = get_args(argv)
    ddp, rank, world_size, device = setup_ddp(args)
    try:
        return train(args, ddp, rank, world_size, device)
    finally:
        if ddp:
            dist.destroy_process_group()


def train(args, ddp, rank, world_size, device):
    master = rank == 0  # logs, evaluates and saves
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log = print if master else (lambda *a, **k: None)

    # ---- output directory: continue a run only when asked, and only with flags that keep it the same run
    ckpt_path, adapter_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "adapter.pt")
    ck = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: --resume: no {ckpt_path}")
        ck = load_checkpoint(ckpt_path)
        check_resume(ck["args"], args)
        if ck.get("world_size", world_size) != world_size:
            raise SystemExit(f"error: --resume: {ckpt_path} was made by {ck['world_size']} processes, this run has "
                             f"{world_size}: another global batch")
    elif not args.overwrite:
        for path in (ckpt_path, adapter_path):
            if os.path.exists(path):
                raise SystemExit(f"error: {path} exists; pass --resume to continue that run or --overwrite to "
                                 f"start over")

    # ---- data and base weights (every download tried before any error)
    t0 = time.time()
    weights, data = fetch_inputs(args, ddp, master)
    x_train, y_train = data["x_train"].to(device), data["y_train"].to(device)
    x_test, y_test = data["x_test"].to(device), data["y_test"].to(device)
    classes = data["classes"]
    log(f"data: {len(x_train)} train / {len(x_test)} test images, {len(classes)} classes, cached at "
        f"{tuple(x_train.shape[2:])} uint8 ({time.time() - t0:.1f}s)")
    global_batch = args.batch_size * args.grad_accum * world_size
    steps_per_epoch = len(x_train) // global_batch
    if steps_per_epoch == 0 and args.method != "none":
        raise SystemExit(f"error: --batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {world_size} "
                         f"process(es) = {global_batch} images per step, more than the {len(x_train)} training images")

    # ---- model and method; the same seed on every rank, so all start identical
    torch.manual_seed(args.seed)  # before build_model: a scratch backbone is rebuilt from the seed on reload
    model = build_model(args, len(classes), weights, classes=classes).to(device)
    try:
        groups = apply_method(model, args)
    except ValueError as e:
        raise SystemExit(f"error: --method {args.method}: {e}")
    torch.manual_seed(args.seed + rank)  # dropout differs across ranks
    n_head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_stored = stored_param_count(model, args.method)
    log(f"method {args.method}: {n_train - n_head:,} trainable parameters without the head (as the papers "
        f"count), {n_train:,} with it; {n_stored:,.0f} stored in adapter.pt; "
        f"model {sum(p.numel() for p in model.parameters()):,}")

    # ---- optimizer and schedule
    max_steps = 0 if args.method == "none" else args.max_iters or args.epochs * steps_per_epoch
    warmup = int(args.warmup_frac * max_steps)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=device_type == "cuda") if n_train else None
    step = 0

    # ---- resume: trainable tensors, optimizer, step, RNG
    if ck is not None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        extra, missing = sorted(set(ck["trainable"]) - trainable), sorted(trainable - set(ck["trainable"]))
        if extra or missing:
            raise SystemExit(f"error: --resume: {ckpt_path} holds other trainable tensors than this run: only in "
                             f"the checkpoint {extra[:4]}, only in this run {missing[:4]}")
        try:
            model.load_state_dict(ck["trainable"], strict=False)
            if opt is not None:
                opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise SystemExit(f"error: --resume: {ckpt_path} does not fit this model: {_why(e)}")
        if master:
            torch.set_rng_state(ck["rng"]["torch"])  # dropout goes on as if never interrupted
            if device_type == "cuda" and ck["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        step = ck["step"]
        log(f"resumed from {ckpt_path} at step {step}")
    raw_model = model
    if ddp and opt is not None:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None,
                    forward_sync_buffers=False)  # the buffers (SiVA's frozen bases) never change
    fwd = torch.compile(model) if args.compile else model
    evaluate_model = torch.compile(raw_model) if args.compile else raw_model

    def save(acc):
        trainable = {n for n, p in raw_model.named_parameters() if p.requires_grad}
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device_type == "cuda" else None}
        save_atomic({"args": vars(args), "step": step,
                     "trainable": {k: v for k, v in raw_model.state_dict().items() if k in trainable},
                     "optimizer": opt.state_dict() if opt is not None else {}, "rng": rng,
                     "world_size": world_size, "test_acc": acc}, ckpt_path)
        save_atomic({"args": vars(args), "method": args.method, "adapter": adapter_state_dict(raw_model, args.method),
                     "head": raw_model.head.state_dict(), "classes": classes, "model_cfg": asdict(raw_model.cfg),
                     "test_acc": acc}, adapter_path)

    def evaluate_and_save(when):
        acc = evaluate(evaluate_model, x_test, y_test, args, ctx)
        log(f"{when}: test accuracy {100 * acc:.2f}% ({len(x_test)} images)")
        save(acc)
        return acc

    # ---- training loop
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
    acc, perm, t_start, step0 = None, None, time.time(), step
    t_log, step_log = t_start, step
    curve, train_loss, seen, train_time = [], None, 0, 0.0  # for the returned summary
    model.train()
    while step < max_steps:
        epoch, j = divmod(step, steps_per_epoch)
        if perm is None or j == 0:  # the order depends on (seed, epoch) only: the same on every rank, and on resume
            perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed + epoch))
            perm = perm.to(device)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, warmup, max_steps)
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            i = (j * args.grad_accum + micro) * world_size + rank  # micro-batch i of the epoch: ranks interleave
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            aug = torch.Generator().manual_seed((args.seed * 1_000_003 + epoch * 100_003 + i) % 2 ** 63)
            xb = preprocess(x_train[idx], args.image_size, train=True, min_scale=args.min_crop, generator=aug)
            if ddp:  # all-reduce the gradients only on the last micro-step
                model.require_backward_grad_sync = micro == args.grad_accum - 1
            with ctx:
                logits = fwd(xb)
            loss = F.cross_entropy(logits.float(), y_train[idx]) / args.grad_accum  # DDP averages over ranks
            loss.backward()
            loss_sum += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_interval == 0 or step == max_steps:
            if ddp:  # the loss of the global batch, as one process would print it
                dist.all_reduce(loss_sum)  # a sum: gloo has no average
            loss_val, now = float(loss_sum) / world_size, time.time()  # float() waits for the device: time after it
            curve.append((step, loss_val))
            train_loss, seen, train_time = loss_val, seen + (step - step_log) * global_batch, train_time + now - t_log
            rate = (step - step_log) * global_batch / (now - t_log)  # over this interval
            eta = (max_steps - step) * (now - t_start) / (step - step0)
            lr = next((g for g in opt.param_groups if g["name"] != "head"), opt.param_groups[0])["lr"]
            log(f"step {step}/{max_steps} | loss {loss_val:.4f} | lr {lr:.2e} | {rate:,.0f} img/s | "
                f"elapsed {hms(now - t_start)} | eta {hms(eta)}")
            t_log, step_log = now, step
        at_eval = step % steps_per_epoch == 0 or step == max_steps or \
            (args.eval_interval and step % args.eval_interval == 0)
        if master and at_eval:
            acc = evaluate_and_save(f"epoch {epoch + 1}" if step % steps_per_epoch == 0 else f"step {step}")
            t_log = time.time()  # images/s counts training only
    if master and acc is None:  # nothing trained in this call: method none, or a finished run resumed
        acc = evaluate_and_save("no training step")
    log(f"saved {args.out_dir}/adapter.pt and ckpt.pt")
    if ddp:
        dist.barrier()  # the other ranks wait for rank 0's last evaluation and save
    return {"model": raw_model, "test_acc": acc, "step": step, "n_trainable": n_train - n_head, "n_head": n_head,
            "n_stored": n_stored, "train_loss": train_loss, "curve": curve, "train_time": train_time,
            "img_per_s": seen / train_time if train_time else None}


if __name__ == "__main__":
    main()
