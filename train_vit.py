"""Fine-tune a ViT for image classification with any nanopeft method (SPEC §10; papers: siva §4.1, sera §4.1).

    python train_vit.py --method siva --dataset cifar10                        # ViT-B/16 in21k, 10 epochs
    python train_vit.py --method lora --init_from vit-large --dataset pets
    python train_vit.py --method bone --init_from scratch --depth 2 --dim 256 --heads 4 --patch_size 4 \
        --image_size 32 --data ../shared/data/cifar10/cifar10_subset_6k_decoded.npz --max_iters 10

Model: a compact pre-norm ViT (class token, learned position embeddings, q/k/v as separate Linears named
attn.q_proj / attn.k_proj / attn.v_proj so methods target them as the papers count them, attn.out_proj,
mlp.fc1 / mlp.fc2, final norm, head), attention by F.scaled_dot_product_attention.

Choices made where the papers and SPEC are silent:
- Checkpoints: Google's ImageNet-21k ViTs in Hugging Face's layout (`--init_from vit-base` =
  google/vit-base-patch16-224-in21k, `vit-large` = google/vit-large-patch16-224-in21k, or any repo id
  with that layout), fetched with huggingface_hub and copied key for key with shape checks; no
  transformers at run time. Their pooler (the in21k pre-logits layer) is dropped: the head reads the
  class token after the final norm, as HF's ViTForImageClassification does. Position embeddings are
  interpolated (bicubic) when --image_size gives another patch grid than the checkpoint's.
- The head is new, zero-initialised (as in the ViT paper's fine-tuning) and always trained, at its own
  --head_lr. `--method head` is the papers' linear probe (LP); `--method none` trains nothing and
  only evaluates --init_from (useful when its classifier fits the classes); to evaluate a fine-tuned
  run, rebuild it with load_finetuned(path to its adapter.pt).
- Per-method defaults for ViT: LoRA r=16, alpha=16 and SiVA perc=0.95 (siva §4.1); SeRA r=split=16
  (sera §4.1, "easy" mode; split = r is its default); Bone b=64 (its paper's default); VB-LoRA r=4,
  h=256, k=2 with b=256 (its GPT-2 setting; b must divide the width: 256 divides 768 and 1024).
  Targets q_proj, v_proj (both papers). Learning rates are not in our copies of the papers; the
  --lr defaults per method are untuned starting points. VB-LoRA: bank at --lr, logits at
  --vblora_logits_lr, no weight decay on either (its paper).
- Data: Hub datasets through `datasets` (ids in DATASETS below; FGVC-Aircraft from the parquet
  conversion of HuggingFaceM4/FGVC-Aircraft, pinned to its commit, as datasets>=4 runs no loading
  scripts), or a local .npz / image folder.
  Images are decoded once into a uint8 tensor cache (kept at their own size when the first 32 share
  one square size no larger than --image_size, else resized once to --image_size), and augmented on the
  device in batches: random-resized-crop (area U(--min_crop, 1), aspect log-U(3/4, 4/3), the box
  clipped to the image) + horizontal flip as one affine grid_sample; so crops only ever upsample.
  Test images are resized (bilinear, antialiased) to --image_size, no crop. Normalisation
  mean = std = 0.5, what Google's in21k checkpoints expect.
- AdamW, linear warmup then cosine decay to 0, gradient clipping; bf16 autocast on CUDA.
- adapter.pt holds the method's adapter state dict (the whole backbone for `full`, compact top-k for
  VB-LoRA), the head and the run's arguments; load_finetuned(path) rebuilds the model from it (a
  scratch backbone is rebuilt from --seed). ckpt.pt holds every trainable tensor, the optimiser, the
  step and the torch RNG states (augmentation draws from them), for --resume. Both are written atomically.
"""
import argparse
import itertools
import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import bone
import lora
import sera
import siva
import vblora

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
            raise ValueError(f"ViT: heads={cfg.n_head} must divide dim={cfg.n_embd}")
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


def read_checkpoint(init_from):
    """-> (state dict in our naming, HF config dict or None), from a file, a folder or the Hub."""
    hf_cfg = None
    if os.path.isdir(init_from):
        names = sorted(os.listdir(init_from))
        weights = [n for n in ("model.safetensors", "pytorch_model.bin") if n in names] or \
                  [n for n in names if n.endswith((".safetensors", ".bin", ".pt", ".pth"))]
        if not weights:
            raise SystemExit(f"no weights (.safetensors/.bin/.pt) in {init_from}")
        path = os.path.join(init_from, weights[0])
        cfg_path = os.path.join(init_from, "config.json")
    elif os.path.isfile(init_from):
        path, cfg_path = init_from, os.path.join(os.path.dirname(init_from), "config.json")
    else:
        repo = HUB_MODELS.get(init_from, init_from)
        try:
            from huggingface_hub import hf_hub_download
            cfg_path = hf_hub_download(repo, "config.json")
            try:
                path = hf_hub_download(repo, "model.safetensors")
            except Exception:
                path = hf_hub_download(repo, "pytorch_model.bin")
        except Exception as e:
            raise SystemExit(f"could not fetch {repo} (config.json + model.safetensors or pytorch_model.bin) "
                             f"from the Hugging Face Hub: {type(e).__name__}: {str(e).splitlines()[0][:200]}\n"
                             f"Offline? Download it elsewhere and pass --init_from PATH (a .safetensors/.bin "
                             f"file or a folder holding it and config.json), or use --init_from scratch.")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            hf_cfg = json.load(f)
    sd = _read_tensors(path)
    if any(k.endswith("embeddings.cls_token") for k in sd):
        sd = hf_to_vit(sd)
    return sd, hf_cfg


def build_model(args, num_classes):
    """ViT from --init_from (scratch, a Hub id/alias, or a local path), with a fresh head."""
    if args.init_from == "scratch":
        return ViT(ViTConfig(args.image_size, args.patch_size, args.depth, args.heads, args.dim,
                             4 * args.dim, num_classes))
    sd, hf_cfg = read_checkpoint(args.init_from)
    if "cls_token" not in sd or "patch_embed.weight" not in sd:
        raise SystemExit(f"{args.init_from}: not a ViT checkpoint (no class token / patch embedding); "
                         f"some keys: {list(sd)[:6]}")
    n_embd, patch = sd["cls_token"].shape[-1], sd["patch_embed.weight"].shape[-1]
    n_layer = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if hf_cfg and hf_cfg.get("hidden_act", "gelu") != "gelu":
        raise SystemExit(f"{args.init_from}: hidden_act={hf_cfg['hidden_act']!r}, this ViT has exact GELU only")
    if hf_cfg and "num_attention_heads" in hf_cfg:
        n_head = hf_cfg["num_attention_heads"]
    else:
        n_head = n_embd // 64
        print(f"no config.json beside {args.init_from}: assuming {n_head} heads of 64 (every Google ViT)")
    eps = hf_cfg.get("layer_norm_eps", 1e-12) if hf_cfg else 1e-12
    cfg = ViTConfig(args.image_size, patch, n_layer, n_head, n_embd, sd["blocks.0.mlp.fc1.weight"].shape[0],
                    num_classes, eps)
    model = ViT(cfg)
    head = load_weights(model, sd)
    print(f"loaded {args.init_from}: {n_layer} layers, dim {n_embd}, {n_head} heads, patch {patch}"
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


def load_npz(path, size):
    """.npz with x_train, y_train, x_test, y_test (uint8 (N, H, W, 3)) and optionally class_names."""
    d = np.load(path, allow_pickle=False)
    out = {}
    for split in ("train", "test"):
        x = d[f"x_{split}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{path}: x_{split} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
        x = torch.from_numpy(x).permute(0, 3, 1, 2)  # (N, 3, H, W)
        square_small = x.shape[2] == x.shape[3] <= size
        out[f"x_{split}"] = x.contiguous() if square_small else cache_images(x, len(x), size)
        out[f"y_{split}"] = torch.from_numpy(d[f"y_{split}"].astype(np.int64))
    n = int(max(out["y_train"].max(), out["y_test"].max())) + 1
    out["classes"] = [str(c) for c in d["class_names"]] if "class_names" in d else [str(i) for i in range(n)]
    return out


def load_folder(path, size):
    """path/train/<class>/*.png|jpg... and path/test/<class>/...; classes = train's subfolders, sorted."""
    from PIL import Image
    classes = sorted(e.name for e in os.scandir(os.path.join(path, "train")) if e.is_dir())
    out = {"classes": classes}
    for split in ("train", "test"):
        root = os.path.join(path, split)
        files = []
        for c in sorted(e.name for e in os.scandir(root) if e.is_dir()):
            if c not in classes:
                raise ValueError(f"{root}/{c}: class not in {path}/train")
            files += [(os.path.join(root, c, f), classes.index(c)) for f in sorted(os.listdir(os.path.join(root, c)))
                      if f.lower().endswith(IMAGE_EXT)]
        if not files:
            raise ValueError(f"{root}: no images in class subfolders")

        def decode(fs=files):
            for f, _ in fs:
                with Image.open(f) as img:
                    yield _pil_to_chw(img)
        out[f"x_{split}"] = cache_images(decode(), len(files), size)
        out[f"y_{split}"] = torch.tensor([y for _, y in files])
    return out


def _unreachable(e):
    """True when e, or an exception it was raised from, is a failed connection or a timeout (the
    requests, httpx and huggingface_hub ones included, by their class names)."""
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError)) or re.search("Connect|Timeout|Offline", type(e).__name__):
            return True
        e = e.__cause__ or e.__context__
    return False


def load_hub(name, size):
    repo, label, revision = DATASETS[name]
    local = ("Pass --data PATH: a .npz with x_train, y_train, x_test, y_test (uint8 NHWC) or a folder with "
             "train/ and test/, each holding one subfolder of images per class.")
    try:
        import datasets
        ds = datasets.load_dataset(repo, revision=revision)
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:500]}"
        if _unreachable(e):
            raise SystemExit(f"could not reach the Hugging Face Hub for the dataset {repo} (--dataset {name}): "
                             f"{why}\nOffline? {local}")
        raise SystemExit(f"could not load the dataset {repo} (--dataset {name}) through `datasets`: {why}\n{local}")
    feats = ds["train"].features
    image = next(k for k, f in feats.items() if isinstance(f, datasets.Image))
    if label not in feats:
        label = next(k for k, f in feats.items() if isinstance(f, datasets.ClassLabel))
    out = {"classes": list(feats[label].names) if isinstance(feats[label], datasets.ClassLabel) else None}
    for split, src in (("train", "train"), ("test", "test" if "test" in ds else "validation")):
        d = ds[src]
        pixels = (_pil_to_chw(ex[image]) for ex in d.select_columns([image]))  # decode no other column
        out[f"x_{split}"] = cache_images(pixels, len(d), size)
        out[f"y_{split}"] = torch.tensor(list(d[label]), dtype=torch.int64)
    if out["classes"] is None:
        out["classes"] = [str(i) for i in range(int(out["y_train"].max()) + 1)]
    return out


def load_data(args):
    if not args.data:
        return load_hub(args.dataset, args.image_size)
    if not os.path.exists(args.data):
        raise SystemExit(f"--data {args.data}: no such file or folder")
    load = load_npz if args.data.endswith(".npz") else load_folder
    return load(args.data, args.image_size)


def random_resized_crop_flip(x, size, min_scale=0.08, ratio=(3 / 4, 4 / 3), flip=True):
    """(B, 3, H, W) float -> (B, 3, size, size): one random box per image (area fraction U(min_scale, 1),
    aspect log-uniform in ratio, clipped to the image), mirrored with probability 1/2, all sampled
    bilinearly by a single grid_sample."""
    B, dev = x.shape[0], x.device
    area = torch.empty(B, device=dev).uniform_(min_scale, 1.0)
    aspect = torch.empty(B, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # box sides as fractions of the image side
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(B, device=dev) * (1 - w) + w / 2) * 2 - 1  # box centre in grid_sample's [-1, 1]
    cy = (torch.rand(B, device=dev) * (1 - h) + h / 2) * 2 - 1
    sign = torch.where(torch.rand(B, device=dev) < 0.5, -1.0, 1.0) if flip else torch.ones(B, device=dev)
    theta = torch.zeros(B, 2, 3, device=dev)  # output [-1, 1] coords -> input coords
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w * sign, cx, h, cy
    grid = F.affine_grid(theta, (B, 3, size, size), align_corners=False)  # (B, size, size, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(x, size, train, min_scale=0.08):
    """uint8 (B, 3, H, W) on the device -> normalised float (B, 3, size, size)."""
    x = x.float() / 255
    if train:
        x = random_resized_crop_flip(x, size, min_scale)
    elif x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - MEAN) / STD


# -----------------------------------------------------------------------------
# methods: name -> (Config from args, apply, adapter state dict, load)

METHODS = {
    "lora": (lambda a: lora.LoRAConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout),
             lora.apply_lora, lora.lora_state_dict, lora.load_lora_state_dict),
    "sera": (lambda a: sera.SeRAConfig(r=a.sera_r, split=a.sera_split, alpha=a.sera_alpha),
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
# --lr defaults: the papers' ViT lr tables are missing from our copies; untuned starting points (VB-LoRA: its bank lr)
METHOD_LR = {"none": 0.0, "full": 2e-5, "head": 0.0, "lora": 5e-3, "sera": 5e-3, "siva": 5e-3, "bone": 1e-4,
             "vblora": 1e-3}


def apply_method(model, args):
    """Set what trains: everything (full), the head only (head), nothing (none), or the method's adapter
    on --targets plus the head."""
    model.requires_grad_(args.method == "full")
    if args.method in METHODS:
        make_cfg, apply, _, _ = METHODS[args.method]
        apply(model, make_cfg(args), args.targets.split(","))
    model.head.requires_grad_(args.method != "none")


def adapter_state(model, method):
    if method == "full":
        return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    return METHODS[method][2](model) if method in METHODS else {}


def load_finetuned(path, device="cpu"):
    """Rebuild a fine-tuned model from adapter.pt: backbone from its --init_from (or --seed for scratch),
    the method applied as in training, then the adapter and the head loaded."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    args = argparse.Namespace(**blob["args"])
    torch.manual_seed(args.seed)
    model = build_model(args, len(blob["classes"])).to(device)
    apply_method(model, args)
    if args.method == "full":
        model.load_state_dict(blob["adapter"], strict=False)
    elif args.method in METHODS:
        METHODS[args.method][3](model, blob["adapter"])
    model.head.load_state_dict(blob["head"])
    return model.eval()


def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# training


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--init_from", default="vit-base",
                   help="vit-base | vit-large (Google in21k on the Hub) | a Hub repo id | a local .safetensors/.bin/"
                        ".pt or folder | scratch")
    g.add_argument("--image_size", type=int, default=224, help="model input side; pos-embeds interpolated if needed")
    g.add_argument("--depth", type=int, default=12, help="scratch only: blocks")
    g.add_argument("--dim", type=int, default=768, help="scratch only: width")
    g.add_argument("--heads", type=int, default=12, help="scratch only: attention heads")
    g.add_argument("--patch_size", type=int, default=16, help="scratch only: patch side")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=list(DATASETS), help="Hub dataset (see DATASETS)")
    g.add_argument("--data", default="", help="local data instead: .npz (x_train, y_train, x_test, y_test, uint8 "
                                              "NHWC) or a folder with train/<class>/ and test/<class>/ images")
    g.add_argument("--min_crop", type=float, default=0.08, help="smallest random-resized-crop area fraction")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="lora", choices=ALL_METHODS,
                   help="none = evaluate only; head = linear probe; full = every weight; else the adapter")
    g.add_argument("--targets", default="q_proj,v_proj", help="comma-separated Linear names to adapt")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank (siva §4.1 ViT setting)")
    g.add_argument("--lora_alpha", type=float, default=16.0, help="LoRA scale = alpha / r")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="LoRA dropout on x")
    g.add_argument("--sera_r", type=int, default=16, help="SeRA mixing width r (sera §4.1 ViT-L easy mode)")
    g.add_argument("--sera_split", type=int, default=16, help="SeRA segments; split = r is its default")
    g.add_argument("--sera_alpha", type=float, default=16.0, help="SeRA scale = alpha / r")
    g.add_argument("--siva_perc", type=float, default=0.95, help="SiVA variance kept frozen (siva §4.1)")
    g.add_argument("--bone_b", type=int, default=64, help="Bone block size; must divide in and out")
    g.add_argument("--bone_grouping", default="col", choices=["col", "row"],
                   help="Bone-col (its paper's default) or Bone-row")
    g.add_argument("--vblora_r", type=int, default=4, help="VB-LoRA rank")
    g.add_argument("--vblora_b", type=int, default=256, help="vector length; must divide the width")
    g.add_argument("--vblora_h", type=int, default=256, help="vectors in the bank")
    g.add_argument("--vblora_k", type=int, default=2, help="top-k vectors per sub-vector")
    g.add_argument("--vblora_logits_lr", type=float, default=1e-2, help="VB-LoRA logits lr (its paper)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10, help="the papers train at most 10")
    g.add_argument("--max_iters", type=int, default=0, help="stop after this many steps (0: run --epochs)")
    g.add_argument("--batch_size", type=int, default=64, help="training images per step")
    g.add_argument("--eval_batch_size", type=int, default=256, help="test images per forward")
    g.add_argument("--lr", type=float, default=None,
                   help="adapter lr (backbone lr for full, bank lr for vblora); None = per method: "
                        + ", ".join(f"{k} {v:g}" for k, v in METHOD_LR.items() if v))
    g.add_argument("--head_lr", type=float, default=5e-3, help="lr of the classification head, every method")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="on matrices, not on biases/norms/VB-LoRA")
    g.add_argument("--warmup_frac", type=float, default=0.1, help="fraction of the steps spent in linear warmup")
    g.add_argument("--grad_clip", type=float, default=1.0, help="0 disables")
    g.add_argument("--seed", type=int, default=0, help="init, data order and augmentation")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (bf16 autocast) or cpu")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--log_interval", type=int, default=20, help="steps between log lines")
    g.add_argument("--out_dir", default="out-vit", help="adapter.pt and ckpt.pt go here")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = METHOD_LR[args.method]
    return args


@torch.no_grad()
def evaluate(model, x, y, args, ctx):
    model.eval()
    correct = 0
    for i in range(0, len(x), args.eval_batch_size):
        xb = preprocess(x[i:i + args.eval_batch_size].to(args.device), args.image_size, train=False)
        with ctx:
            correct += (model(xb).argmax(-1) == y[i:i + args.eval_batch_size].to(args.device)).sum().item()
    model.train()
    return correct / len(x)


def param_groups(model, args):
    """AdamW groups, each named for the log: head at --head_lr, VB-LoRA logits at --vblora_logits_lr, the
    rest (adapter, VB-LoRA bank, or the backbone for full) at --lr; weight decay on matrices only and never
    on VB-LoRA's bank or logits."""
    lrs = {"head": args.head_lr, "logits": args.vblora_logits_lr}
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


def main(argv=None):
    args = get_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    t0 = time.time()
    data = load_data(args)
    x_train, y_train = data["x_train"].to(args.device), data["y_train"].to(args.device)
    x_test, y_test = data["x_test"].to(args.device), data["y_test"].to(args.device)
    classes = data["classes"]
    print(f"data: {len(x_train)} train / {len(x_test)} test images, {len(classes)} classes, cached at "
          f"{tuple(x_train.shape[2:])} uint8 ({time.time() - t0:.1f}s)")

    torch.manual_seed(args.seed)  # before build_model: a scratch backbone is rebuilt from the seed on reload
    model = build_model(args, len(classes)).to(args.device)
    try:
        apply_method(model, args)
    except ValueError as e:
        raise SystemExit(f"--method {args.method}: {e}")
    n_head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"method {args.method}: {n_train - n_head:,} trainable parameters without the head (as the papers "
          f"count), {n_train:,} with it; model {n_all:,}")
    if args.method == "vblora":
        print(f"VB-LoRA stored parameters (bank + top-k indices and weights): "
              f"{vblora.vblora_stored_param_count(model):,.0f}")
    fwd = torch.compile(model) if args.compile else model

    spe = math.ceil(len(x_train) / args.batch_size)  # steps per epoch
    max_steps = 0 if args.method == "none" else args.max_iters if args.max_iters > 0 else args.epochs * spe
    warmup = int(args.warmup_frac * max_steps)
    opt = None
    if n_train:
        opt = torch.optim.AdamW(param_groups(model, args), betas=(0.9, 0.999), fused=device_type == "cuda")
    step = 0
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"--resume: no {ckpt_path}")
        ck = torch.load(ckpt_path, map_location=args.device, weights_only=True)
        if ck["args"]["method"] != args.method:
            raise SystemExit(f"--resume: {ckpt_path} was trained with --method {ck['args']['method']}")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        extra, missing = sorted(set(ck["model"]) - trainable), sorted(trainable - set(ck["model"]))
        if extra or missing:
            raise SystemExit(f"--resume: {ckpt_path} holds other trainable tensors than this run (other --targets "
                             f"or method flags?): only in the checkpoint {extra[:6]}, only in this run {missing[:6]}")
        try:
            model.load_state_dict(ck["model"], strict=False)
        except RuntimeError as e:  # shape mismatches: other method flags than the checkpoint's
            raise SystemExit(f"--resume: {ckpt_path} does not fit this model: {str(e)[:500]}")
        if opt is not None:
            try:
                opt.load_state_dict(ck["optimizer"])
            except ValueError as e:  # other parameter groups: other lrs, weight decay or method flags
                raise SystemExit(f"--resume: the optimizer state in {ckpt_path} does not fit this run's parameter "
                                 f"groups (other --lr/--head_lr/--weight_decay or method flags?): {e}")
        torch.set_rng_state(ck["rng"].cpu())  # the augmentation goes on as if never interrupted
        if device_type == "cuda" and ck["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu(), args.device)
        step = ck["step"]
        print(f"resumed from {ckpt_path} at step {step}")

    def save(acc):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        save_atomic({"model": {k: v for k, v in model.state_dict().items() if k in trainable},
                     "optimizer": opt.state_dict() if opt is not None else {}, "step": step,
                     "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state(args.device) if device_type == "cuda" else None,
                     "args": vars(args), "test_acc": acc}, ckpt_path)
        save_atomic({"args": vars(args), "classes": classes, "test_acc": acc,
                     "adapter": adapter_state(model, args.method), "head": model.head.state_dict()},
                    os.path.join(args.out_dir, "adapter.pt"))

    model.train()
    acc, perm, t_start, t_log, step0, step_log = None, None, time.time(), time.time(), step, step
    while step < max_steps:
        epoch, j = divmod(step, spe)
        if perm is None or j == 0:  # the order depends on (seed, epoch) only, so a resumed run sees the same
            perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed + epoch))
            perm = perm.to(args.device)
        mult = (step + 1) / (warmup + 1) if step < warmup else \
            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, max_steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * mult
        idx = perm[j * args.batch_size:(j + 1) * args.batch_size]
        xb = preprocess(x_train[idx], args.image_size, train=True, min_scale=args.min_crop)
        with ctx:
            loss = F.cross_entropy(fwd(xb).float(), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.grad_clip)
        opt.step()
        step += 1
        if step % args.log_interval == 0 or step == max_steps:
            loss_val, now = loss.item(), time.time()  # .item() waits for the device: time after it
            rate = (step - step_log) * args.batch_size / (now - t_log)  # over this interval
            eta = (max_steps - step) * (now - t_start) / (step - step0)
            lrs = " ".join(f"{k} {v:.2e}" for k, v in {g["name"]: g["lr"] for g in opt.param_groups}.items())
            print(f"step {step}/{max_steps} | epoch {epoch + 1} | loss {loss_val:.4f} | lr {lrs} | "
                  f"{rate:.1f} img/s | elapsed {now - t_start:.0f}s | eta {eta:.0f}s")
            t_log, step_log = now, step
        if step % spe == 0 or step == max_steps:
            acc = evaluate(fwd, x_test, y_test, args, ctx)
            when = f"epoch {epoch + 1}" if step % spe == 0 else f"step {step} (end of the --max_iters run)"
            print(f"{when}: test accuracy {100 * acc:.2f}% ({len(x_test)} images)")
            save(acc)
            t_log = time.time()  # images/s counts training only
    if acc is None:  # nothing trained in this call: method none, or a finished run resumed
        acc = evaluate(fwd, x_test, y_test, args, ctx)
        print(f"test accuracy {100 * acc:.2f}% ({len(x_test)} images)")
        save(acc)
    print(f"saved {args.out_dir}/adapter.pt and ckpt.pt")
    return {"model": model, "test_acc": acc}


if __name__ == "__main__":
    main()
