"""Image classification data: Hub datasets, local .npz files and folders, and GPU-side augmentation.

Hub datasets come through `datasets` (ids in DATASETS; FGVC-Aircraft from the parquet conversion of
HuggingFaceM4/FGVC-Aircraft, pinned to its commit, as datasets>=4 runs no loading scripts); local data is
an .npz or an image folder (layout in DATA_LAYOUT), checked before any training. Images are decoded once
into a uint8 tensor cache (kept at their own size when the first 32 share one square size no larger than
the model's input, else resized once to it), and augmented on the device in batches:
random-resized-crop (area U(min_crop, 1), aspect log-U(3/4, 4/3), the box clipped to the image) +
horizontal flip as one affine grid_sample; so crops only ever upsample. Test images are resized
(bilinear, antialiased), no crop. Normalisation mean = std = 0.5, what Google's in21k checkpoints expect.

    data = load_data(args)     # {x_train, y_train, x_test, y_test, classes} from --data or --dataset
    x = preprocess(data["x_train"][:64], 224, train=True)
"""
import itertools
import math
import os
import re
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

from common import Missing, unreachable, why

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
        raise SystemExit(f"error: {where}: not a readable .npz: {why(e)}")
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
        if unreachable(e):
            raise Missing(f"the dataset {repo} (--dataset {name}; the download broke off: {why(e)}): {local}")
        raise SystemExit(f"error: could not load the dataset {repo} (--dataset {name}) through `datasets`: "
                         f"{why(e)}; {local}")
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
