"""Every method side by side on small pretrained bases: a mini-reproduction on a laptop CPU.

    python reproduce.py                        # both sides, seeds 0 and 1; results in out-repro/results.md
    python reproduce.py --data DIR             # offline, from local files (the layout below)
    python reproduce.py --sweep                # the learning-rate sweep behind GPT2_LR and VIT_LR
    python reproduce.py --device cuda          # the same on a GPU, in minutes
    python reproduce.py --quick --out_dir /tmp/repro    # tiny sizes: checks the pipeline, not the methods

No training loop here: every row is one call of train_gpt2.main or train_vit.main with its flags.

Data. With no --data, what is needed is fetched once and prepared under OUT_DIR/data: E2E through
e2e.load_e2e (the Hub's parquet export), CIFAR-10 through images.load_hub (`datasets`), the GPT-2
BPE through tiktoken. Offline, one message lists what could not be had. --data DIR holds the same files:
e2e/{trainset,devset,testset_w_refs}.csv (github.com/tuetschek/e2e-dataset), gpt2/{vocab.bpe,encoder.json}
and cifar10/cifar10_subset_6k_decoded.npz (any .npz in train_vit.py's layout, 500 training and 100 test
images per class; or --cifar PATH). From either, the same preparation:
- E2E in LoRA's form (e2e.load_e2e, token for token as microsoft/LoRA's files), written as LoRA's
  e2e/{train,valid,test}.txt, which train_gpt2.py --data_dir reads as they are.
- E2E test: N_TEST MRs drawn at random (seed 0) from the whole test set, with all their references. (The
  first MRs of the file are a few restaurants only: one missed name would move the whole score.)
- CIFAR-10: 500 training and 100 test images per class (the first ones of each class); the last 50
  training images of each class are held out as a validation split, used by --sweep only.

Language. A 4-layer, 256-wide GPT-2 (GPT-2 BPE) is pretrained from scratch as a plain language model
(train_gpt2.py --lm_text) on the E2E training references (LoRA's tokenized form) *without* their MRs, each
ending in <|endoftext|>,
until its dev LM loss flattens: it knows how restaurant descriptions read and where they end, not which MR
they describe. Then every method is
fine-tuned on E2E (MR -> reference) for the same steps; the untouched base decoded zero-shot is the floor,
full fine-tuning the ceiling. Vision. A 4-layer, 64-wide ViT (32x32, patch 4) is pretrained on CIFAR-10
classes 0-4, then adapted to classes 5-9: head only (linear probe), full, and each method + head.

What is measured, per method and seed (the tables show the mean over seeds):
- GPT-2: dev loss (plain cross-entropy on 200 dev examples) and the share of the zero-shot -> full
  fine-tuning dev-loss gap it closes; BLEU and ROUGE-L (beam 4) on the sampled test MRs; and slot
  accuracy, in the spirit of the E2E challenge's slot error rate: the share of outputs that state the MR's
  `name`, and its `near` where it has one, verbatim (case aside). Those values must be copied from the MR.
- ViT: test accuracy on classes 5-9.
- The papers' analyses on the adapted models (SiVA effective rank, VB-LoRA bank usage, Bone norms, SeRA
  subspace similarity between seeds); the figures curves.png (loss curves, mean over seeds, and the bases'
  pretraining) and efficiency.png (the metric against *stored* parameters, as VB-LoRA's Figure 1), when
  matplotlib is installed.

Settings. Each method runs with its script's per-method defaults (targets, rank, alpha), except where a
size cannot divide these small widths or would make one dense block (ours): Bone b = 16; VB-LoRA b = 64 on
GPT-2 (width 256) and 32 on the ViT (width 64). Warm-up 30 steps on GPT-2 (the recipe's 500 exceed the
run); ViT --min_crop 0.5 (0.08 is too strong an augmentation for a few hundred steps from scratch). The
scripts' learning rates were set for GPT-2 Medium / ViT-B over thousands of steps; here each method's lr
comes from `--sweep` (GPT2_LR, VIT_LR below), picked on held-out data only: GPT-2 by dev loss, the ViT by
validation accuracy. Never on test.

Caching: OUT_DIR/<side>/<row> holds each run and its result.json, keyed on the run's flags and on the key
of the base it starts from; a rerun reuses every finished row whose key matches and redoes the rest. The
bases are trained once (seed 0); the seeds vary the adapters' init, data order and augmentation.
"""
import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import random
import time

import numpy as np
import torch

import bone
import images
import sera
import siva
import train_gpt2
import train_vit
import vblora
from common import Missing, fetch_all
from e2e import E2E_FILES, GPT2_BPE_SHA256, LORA_FILES, get_tokenizer, load_e2e, read_lora_txt

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--out_dir", default="out-repro", help="runs, prepared data, results.md, curves.png, efficiency.png")
p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
p.add_argument("--quick", action="store_true", help="tiny models and a few steps: checks the pipeline, not the methods")
p.add_argument("--sweep", action="store_true", help="the learning-rate sweep (seed 0, held-out data) instead of the "
               "tables; its picks are written into GPT2_LR and VIT_LR by hand")
p.add_argument("--seeds", default="0,1", help="comma list of seeds; every row runs once per seed")
p.add_argument("--only", default="both", choices=["both", "gpt2", "vit"], help="run one side only")
p.add_argument("--data", default=None, help="local data instead of downloads: a folder holding e2e/ (the official "
               "CSVs), gpt2/ (vocab.bpe, encoder.json) and cifar10/cifar10_subset_6k_decoded.npz")
p.add_argument("--cifar", default=None, help="CIFAR-10 as an .npz or folder (train_vit.py --data); default: "
               "DATA/cifar10/cifar10_subset_6k_decoded.npz, or the Hub without --data")

N_TEST = 50  # sampled test MRs (of 630)
PER_CLASS = (500, 100, 50)  # CIFAR-10 per class: training images, test images, of the training ones held out
LAYOUT = ("a folder holding e2e/{trainset,devset,testset_w_refs}.csv (github.com/tuetschek/e2e-dataset), "
          "gpt2/{vocab.bpe,encoder.json} (openaipublic.blob.core.windows.net/gpt-2/encodings/main/) and "
          "cifar10/cifar10_subset_6k_decoded.npz (or --cifar PATH)")

# Learning rates: picked on held-out data only by `python reproduce.py --sweep`: each grid starts at the script
# default and 5x it (full: more) and grows by x5 steps until its best has a worse neighbour on each side; GPT-2 by
# dev loss (seed 0), the ViT by validation accuracy (mean of seeds 0 and 1: one 250-image split is too noisy).
# The picks and every grid: docs/reproduction.md and assets/sweep.md.
GPT2_SWEEP = {"full": ["5e-5", "2.5e-4", "1e-3"], "lora": ["2e-4", "1e-3"], "sera": ["2e-4", "1e-3"],
              "siva": ["2e-3", "1e-2"], "bone": ["2e-4", "1e-3"], "vblora": [("1e-3", "1e-2"), ("5e-3", "5e-2")]}
VIT_SWEEP = {"full": ["2e-5", "1e-4", "5e-4"], "lora": ["5e-3", "2.5e-2"], "sera": ["5e-3", "2.5e-2"],
             "siva": ["5e-3", "2.5e-2"], "bone": ["1e-4", "5e-4"], "vblora": [("1e-3", "1e-2"), ("5e-3", "5e-2")]}
GPT2_LR = {"full": "2.5e-4", "lora": "5e-3", "sera": "2.5e-2", "siva": "2.5e-1", "bone": "5e-3",
           "vblora": ("2.5e-2", "2.5e-1")}
VIT_LR = {"full": "1e-4", "lora": "5e-3", "sera": "2.5e-2", "siva": "6.25e-1", "Bone-col": "5e-4", "Bone-row": "1.25e-2",
          "vblora": ("2.5e-2", "2.5e-1")}  # keyed by row name where the two Bone groupings differ


def lr_flags(lr):
    """A sweep value -> the script's flags: VB-LoRA's (bank, logits) pair, or --lr."""
    if isinstance(lr, tuple):
        return ["--vblora_bank_lr", lr[0], "--vblora_logits_lr", lr[1]]
    return ["--lr", lr]


def scale_lr(lr, factor):
    """A sweep value times factor, written as the grids write theirs ("5e-3", "2.5e-2"); a VB-LoRA pair scales
    both of its rates."""
    if isinstance(lr, tuple):
        return tuple(scale_lr(x, factor) for x in lr)
    m, e = f"{float(lr) * factor:e}".split("e")
    return f"{m.rstrip('0').rstrip('.')}e{int(e)}"


def bracket(grid, score, limits=(1e-6, 10.0)):
    """score(lr) over the grid (lower is better), extended by x5 steps past whichever end holds the best (or ties
    with it), until the best has a worse neighbour on each side, or the next step would leave `limits`.
    -> [(lr, score)] in increasing lr, and whether the best is bracketed."""
    grid, seen = list(grid), {}
    while True:
        for lr in grid:
            if lr not in seen:
                seen[lr] = score(lr)
        best = min(seen[lr] for lr in grid)
        ends = [i for i in (0, len(grid) - 1) if seen[grid[i]] == best]  # a tie at an end is not bracketed
        if not ends:
            return [(lr, seen[lr]) for lr in grid], True
        i = ends[0]
        new = scale_lr(grid[i], 0.2 if i == 0 else 5.0)
        first = float(new[0] if isinstance(new, tuple) else new)
        if not limits[0] <= first <= limits[1]:
            return [(lr, seen[lr]) for lr in grid], False
        grid = [new] + grid if i == 0 else grid + [new]


def cached_run(main, argv, out, deps=(), analyse=None):
    """main(argv) in folder `out`, or its result.json when a run with the same key finished there."""
    key = hashlib.sha1(json.dumps([main.__module__, argv, list(deps)]).encode()).hexdigest()[:16]
    path = os.path.join(out, "result.json")
    if os.path.isfile(path):
        with open(path) as f:
            r = json.load(f)
        if r.get("key") == key:
            return r
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "log.txt"), "w", buffering=1) as log, contextlib.redirect_stdout(log):
        res = main(argv + ["--out_dir", out, "--overwrite"])  # --overwrite: a stale or half-done run
    trains = "--max_iters" in argv and argv[argv.index("--method") + 1] != "none"  # zero-shot takes no step
    if trains and res.get("step") != int(argv[argv.index("--max_iters") + 1]):
        # the scripts stop at --epochs too: a base or row that ran short would be reported as if it had not
        raise RuntimeError(f"{out}: stopped at step {res.get('step')}, not --max_iters "
                           f"{argv[argv.index('--max_iters') + 1]}; raise its --epochs")
    r = {k: v for k, v in res.items() if k != "model"}
    r.update(key=key, analysis=analyse(res["model"]) if analyse else "")
    with open(path + ".tmp", "w") as f:
        json.dump(r, f)
    os.replace(path + ".tmp", path)  # a result.json is always a finished run
    return r


# ---- data: fetched or local, then prepared the same way under OUT_DIR/data


def write_lora_txt(path, rows):
    """rows [(context, completion)] as one of LoRA's E2E files (context||completion lines), atomically."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(f"{context}||{completion}\n" for context, completion in rows))
    os.replace(path + ".tmp", path)


def sample_test_mrs(rows, n, seed=0):
    """The rows of n MRs drawn at random from every distinct MR of the test set (kept in file order)."""
    mrs = list(dict.fromkeys(mr for mr, _ in rows))  # distinct, in order
    keep = set(random.Random(seed).sample(mrs, min(n, len(mrs))))
    return [(mr, ref) for mr, ref in rows if mr in keep]


def references_by_mr(rows, seed=0):
    """The training references without their MRs, one a line, each ending in `<|endoftext|>` (GPT-2's mark
    between documents, read as EOS by --lm_text, so the base learns where a description ends), grouped: every
    reference of one MR together, the groups in a seeded random order. A pretraining block then holds several
    descriptions of one restaurant, so copying a name from earlier in the context pays, as it does in web text;
    the MR itself is never seen."""
    groups = {}
    for mr, ref in rows:
        groups.setdefault(mr, []).append(" ".join(ref.split()))
    order = list(groups)
    random.Random(seed).shuffle(order)
    return "".join(ref + "<|endoftext|>\n" for mr in order for ref in groups[mr])


def cifar_subset(data):
    """{x, y} per split of a CIFAR-10 load: the first PER_CLASS images of each class; train_vit's (N, 3, H, W)
    tensors -> the .npz layout's (N, H, W, 3) uint8 arrays."""
    out = {"class_names": np.array(data["classes"])}
    for split, n in (("train", PER_CLASS[0]), ("test", PER_CLASS[1])):
        y = data[f"y_{split}"]
        idx = torch.cat([(y == c).nonzero()[:n, 0] for c in range(len(data["classes"]))])
        out[f"x_{split}"] = data[f"x_{split}"][idx].permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
        out[f"y_{split}"] = y[idx].numpy()
    return out


def save_vit_npz(path, x_train, y_train, x_test, y_test, class_names):
    with open(path + ".tmp", "wb") as f:
        np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=class_names)
    os.replace(path + ".tmp", path)


def prepare_data(args, sides):
    """-> {e2e, bpe, refs, vit, vit_val}: local paths the rows read. Fetched (or read from --data) once;
    a rerun finds them prepared. Offline with no --data: one message naming everything and --data."""
    d = os.path.join(args.out_dir, "data")
    paths = dict(e2e=os.path.join(d, "e2e"), refs=os.path.join(d, "e2e_train_documents.txt"),
                 bpe=os.path.join(args.data, "gpt2") if args.data else None,
                 vit=os.path.join(d, "cifar10.npz"), vit_val=os.path.join(d, "cifar10_val.npz"))
    need_gpt2 = "gpt2" in sides and not os.path.isfile(paths["refs"])
    need_vit = "vit" in sides and not os.path.isfile(paths["vit_val"])
    cifar = args.cifar or (os.path.join(args.data, "cifar10", "cifar10_subset_6k_decoded.npz") if args.data else None)
    if args.data:  # every local file checked before any work
        want = ([os.path.join(args.data, "e2e", f) for f in E2E_FILES.values()] +
                [os.path.join(paths["bpe"], f) for f in GPT2_BPE_SHA256]) if "gpt2" in sides else []
        missing = [f for f in want + ([cifar] if "vit" in sides else []) if not os.path.exists(f)]
        if missing:
            raise SystemExit(f"error: --data {args.data}: missing {', '.join(missing)}; --data takes {LAYOUT}")

    def local_or_hub(job):  # a Missing from the scripts names their flags; here --data replaces them all
        def run(online):
            try:
                return job(online)
            except Missing as e:
                raise Missing(str(e.code).split(": pass ")[0])
        return run
    jobs = {}
    if need_gpt2:
        jobs["e2e"] = local_or_hub(lambda online: load_e2e(
            os.path.join(args.data, "e2e") if args.data else None, online))
        if not args.data:  # the BPE: tiktoken's download, cached by tiktoken for every row
            jobs["bpe"] = local_or_hub(lambda online: get_tokenizer(None, online))
    if need_vit:
        vit_args = train_vit.get_args(["--image_size", "32"] + (["--data", cifar] if cifar else []))
        jobs["cifar"] = local_or_hub(lambda online: images.load_data(vit_args, online))
    try:
        got = fetch_all(jobs)
    except SystemExit as e:
        raise SystemExit(f"{e.code}\npass --data DIR instead, {LAYOUT}")
    os.makedirs(paths["e2e"], exist_ok=True)
    if need_gpt2:
        e2e = got["e2e"]
        write_lora_txt(os.path.join(paths["e2e"], LORA_FILES["train"]), e2e["train"])
        write_lora_txt(os.path.join(paths["e2e"], LORA_FILES["dev"]), e2e["dev"])
        write_lora_txt(os.path.join(paths["e2e"], LORA_FILES["test"]), sample_test_mrs(e2e["test"], N_TEST))
        with open(paths["refs"] + ".tmp", "w", encoding="utf-8") as f:  # the references alone: words, not the task
            f.write(references_by_mr(e2e["train"]))
        os.replace(paths["refs"] + ".tmp", paths["refs"])
    if need_vit:
        c = cifar_subset(got["cifar"])
        per_class = len(c["y_train"]) // len(c["class_names"])
        held = np.arange(len(c["y_train"])) % per_class >= per_class - PER_CLASS[2]  # the last 50 of each class
        train = (c["x_train"][~held], c["y_train"][~held])
        save_vit_npz(paths["vit"], *train, c["x_test"], c["y_test"], c["class_names"])
        save_vit_npz(paths["vit_val"], *train, c["x_train"][held], c["y_train"][held], c["class_names"])
    return paths


# ---- what is measured beyond the scripts' own metrics


def mr_slots(mr):
    """LoRA's 'name : The Eagle | Type : pub | near : Burger King' -> {'name': 'The Eagle', 'Type': 'pub', ...}."""
    return dict(field.split(" : ", 1) for field in mr.split(" | "))


def slot_accuracy(mrs, outputs, slots=("name", "near")):
    """{slot: share of outputs stating the value verbatim (case aside), among those whose MR has that slot}
    and "all": the share stating every one of `slots` their MR has."""
    hits = {s: [] for s in slots}
    every = []
    for mr, out in zip(mrs, outputs):
        values = mr_slots(mr)
        ok = {s: values[s].lower() in out.lower() for s in slots if s in values}
        for s, v in ok.items():
            hits[s].append(v)
        every.append(all(ok.values()))
    share = {s: sum(h) / len(h) if h else None for s, h in hits.items()}
    share["all"] = sum(every) / len(every) if every else None
    return share


def gap_closed(dev, zero_shot, full):
    """The share of the zero-shot -> full fine-tuning dev-loss gap a method closes."""
    return (zero_shot - dev) / (zero_shot - full)


# ---- the papers' analyses, one line each
def siva_line(m):
    er = [(siva.effective_rank(l.base.weight), siva.effective_rank(l.base.weight + l.delta_weight()))
          for l in m.modules() if isinstance(l, siva.SiVALinear)]
    return (f"SiVA effective rank, mean over {len(er)} layers: W {sum(a for a, _ in er) / len(er):.2f} -> "
            f"W+dW {sum(b for _, b in er) / len(er):.2f}")


def vblora_line(m):
    u = vblora.vector_usage(m)
    return (f"VB-LoRA vectors in use: {int((u > 0).sum())}/{len(u)}, the most used picked {int(u.max())}x of "
            f"{int(u.sum())} picks")


def bone_line(m):
    n = bone.bone_weight_guide_norms(m).values()
    return (f"Bone norms, mean over {len(n)} layers: guide {sum(x['guide'] for x in n) / len(n):.4f}, tile "
            f"{sum(x['tile'] for x in n) / len(n):.4f}, dW {sum(x['delta'] for x in n) / len(n):.4f}")


ANALYSE = {"siva": siva_line, "vblora": vblora_line, "bone": bone_line}


def sera_similarity(script, outs):
    """Mean over adapted layers of phi(dW_seed_a, dW_seed_b, r, r) (SeRA Eq. 4) between the first two seeds."""
    with contextlib.redirect_stdout(None):  # load_finetuned's "loaded ..." lines
        ms = [script.load_finetuned(os.path.join(o, "adapter.safetensors")) for o in outs[:2]]
    layers = [[(n, l) for n, l in m.named_modules() if isinstance(l, sera.SeRALinear)] for m in ms]
    phi = [sera.subspace_similarity(a.delta_weight(), b.delta_weight(), a.cfg.r, b.cfg.r)
           for (_, a), (_, b) in zip(*layers)]
    return f"SeRA subspace similarity phi(dW_seed0, dW_seed1, r, r), mean over {len(phi)} layers: {sum(phi) / len(phi):.3f}"


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def fmt(v, spec, scale=1):
    return "–" if v is None else format(scale * v, spec)


def mean_curve(curves):
    """Step-wise mean of several [(step, value)] curves (the same steps), the shortest length."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [(curves[0][i][0], sum(c[i][1] for c in curves) / len(curves)) for i in range(n)]


# ---- figures (matplotlib is optional)


def figures(out_dir, panels, points):
    """curves.png: one panel per entry of `panels` {title: {label: curve}}; efficiency.png: one panel per
    entry of `points` {title: (ylabel, {label: (stored, value)}, {line label: value})}. Returns the lines for
    results.md."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["Figures: skipped, matplotlib is not installed (pip install matplotlib, then rerun: every row "
                "comes from the cache)."]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for label, c in lines.items():
            if c:
                ax.plot(*zip(*c), label=label, lw=1.2, marker="o" if len(c) < 12 else None, ms=3)
        ax.set(title=title, xlabel="step", ylabel="loss")
        ax.legend(fontsize=7)
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=110, bbox_inches="tight")
    fig, axes = plt.subplots(1, len(points), figsize=(5.6 * len(points), 4), squeeze=False)
    for ax, (title, (ylabel, pts, hlines)) in zip(axes[0], points.items()):
        ax.set(title=title, xlabel="stored parameters (log scale)", ylabel=ylabel, xscale="log")
        for label, (x, y) in pts.items():
            ax.scatter([x], [y])
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for label, y in hlines.items():
            ax.axhline(y, color="grey", ls="--", lw=0.8, label=label)
        if hlines:
            ax.legend(fontsize=7, loc="lower right")
    fig.savefig(os.path.join(out_dir, "efficiency.png"), dpi=110, bbox_inches="tight")
    return [f"Figures: {os.path.join(out_dir, 'curves.png')}, {os.path.join(out_dir, 'efficiency.png')}"]


def keep_freed_memory():
    """On Linux, glibc hands every freed block above 32 MB straight back to the OS, so each pretraining
    step's (tokens x 50,257) logits are page-faulted in anew; keeping freed memory in the process
    (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) saves that (measured: docs/reproduction.md)."""
    if platform.system() == "Linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
            libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: and stay there when freed


# ---- the two sides


def gpt2_side(args, paths, seeds, q, dev):
    G = dict(n_layer=1, n_head=2, n_embd=64, pre_iters=4, pre_batch=4, ft_iters=4, beam=2, new=8, dev=2) if q else \
        dict(n_layer=4, n_head=4, n_embd=256, pre_iters=500, pre_batch=16, ft_iters=300, beam=4, new=64, dev=25)
    bpe = ["--bpe_dir", paths["bpe"]] if paths["bpe"] else []
    base_argv = ["--lm_text", paths["refs"], "--method", "full", "--init_from", "scratch",
                 "--n_layer", str(G["n_layer"]), "--n_head", str(G["n_head"]), "--n_embd", str(G["n_embd"]),
                 "--block_size", "160", "--max_len", "128", "--batch_size", str(G["pre_batch"]), "--lr", "1e-3",
                 "--warmup_iters", "30", "--label_smoothing", "0", "--max_iters", str(G["pre_iters"]),
                 "--eval_iters", str(G["dev"]), "--eval_interval", str(max(G["pre_iters"] // 10, 1)),
                 "--log_interval", "10", *bpe, "--seed", "0", *dev]
    t0 = time.time()
    base = cached_run(train_gpt2.main, base_argv, os.path.join(args.out_dir, "gpt2", "base"),
                      deps=[os.path.getsize(paths["refs"])])
    print(f"GPT-2 base: dev LM loss {base['dev_loss']:.3f}, {base['tokens_per_s']:,.0f} tok/s ({time.time() - t0:.0f}s)")
    base_pt = os.path.join(args.out_dir, "gpt2", "base", "adapter.safetensors")
    rows = [("zero-shot", "none", []), ("full", "full", []), ("LoRA", "lora", []), ("SeRA", "sera", []),
            ("SiVA", "siva", []), ("Bone-col", "bone", ["--bone_grouping", "col"]),
            ("Bone-row", "bone", ["--bone_grouping", "row"]), ("VB-LoRA", "vblora", [])]
    test = read_lora_txt(os.path.join(paths["e2e"], LORA_FILES["test"]))
    test_mrs = list(dict.fromkeys(context for context, _ in test))  # the decode order
    ref_words = mean(len(ref.split()) for _, ref in test)  # what an output's length is measured against
    res, sweep = {}, []
    for name, method, extra in rows:
        if args.sweep and method == "none":
            continue
        sizes = (["--bone_b", "16"] if method == "bone" else []) + (["--vblora_b", "64"] if method == "vblora" else [])

        def run(lr, seed):
            argv = ["--method", method, "--init_from", base_pt, "--data_dir", paths["e2e"], *bpe, *extra, *sizes,
                    *(lr_flags(lr) if lr else []), "--max_iters", str(G["ft_iters"]), "--warmup_iters", "30",
                    "--eval_iters", str(G["dev"]),
                    # the documented run: dev loss every third of the run, to show whether 300 steps were enough
                    "--eval_interval", "100000" if args.sweep else str(max(G["ft_iters"] // 3, 1)), "--log_interval", "10",
                    *(["--eval_samples", "0"] if args.sweep else []), "--beam", str(G["beam"]),
                    "--max_new_tokens", str(G["new"]), "--seed", str(seed), *dev]
            tag = f"{name}-lr{lr if isinstance(lr, str) else '-'.join(lr)}" if args.sweep else name
            out = os.path.join(args.out_dir, "gpt2-sweep" if args.sweep else "gpt2", f"{tag}-s{seed}")
            t0 = time.time()
            r = cached_run(train_gpt2.main, argv, out, deps=[base["key"]], analyse=ANALYSE.get(method))
            r.update(out=out, seconds=time.time() - t0)
            return r

        if args.sweep:  # dev loss, seed 0, until the best lr has a worse neighbour on each side
            grid, ok = bracket(GPT2_SWEEP[method], lambda lr: run(lr, seeds[0])["dev_loss"])
            sweep += [(name, lr, v, ok) for lr, v in grid]
            print(f"GPT-2 sweep {name}: " + ", ".join(f"{lr} {v:.4f}" for lr, v in grid))
            continue
        for seed in seeds[:1] if method == "none" else seeds:  # zero-shot has no randomness
            r = run(None if q else GPT2_LR.get(name, GPT2_LR.get(method)), seed)
            r["slots"] = slot_accuracy(test_mrs, r["predictions"]) if r["predictions"] else {}
            r["words"] = mean(len(p.split()) for p in r["predictions"]) if r["predictions"] else None
            res.setdefault(name, []).append(r)
            print(f"GPT-2 {name} seed {seed}: dev loss {r['dev_loss']:.3f}, BLEU {100 * r['scores'].get('BLEU', 0):.2f}, "
                  f"name {fmt(r['slots'].get('name'), '.0%')} ({r['seconds']:.0f}s)")
    return G, base, res, sweep, len(test_mrs), ref_words


def vit_side(args, paths, seeds, q, dev):
    V = dict(n_layer=1, n_embd=32, n_head=2, pre_iters=4, ft_iters=4) if q else \
        dict(n_layer=4, n_embd=64, n_head=4, pre_iters=1200, ft_iters=300)
    data = paths["vit_val"] if args.sweep else paths["vit"]
    shape = ["--image_size", "32", "--min_crop", "0.5", *dev]
    base_argv = ["--method", "full", "--init_from", "scratch", "--n_layer", str(V["n_layer"]), "--n_embd",
                 str(V["n_embd"]), "--n_head", str(V["n_head"]), "--patch_size", "4", "--classes", "0-4",
                 "--lr", "1e-3", "--max_iters", str(V["pre_iters"]), "--epochs", "100", "--batch_size", "64",
                 "--log_interval", "10",
                 "--seed", "0", "--data", paths["vit"], *shape]
    t0 = time.time()
    base = cached_run(train_vit.main, base_argv, os.path.join(args.out_dir, "vit", "base"),
                      deps=[os.path.getsize(paths["vit"])])
    print(f"ViT base: classes 0-4 test accuracy {100 * base['test_acc']:.1f}% ({time.time() - t0:.0f}s)")
    base_pt = os.path.join(args.out_dir, "vit", "base", "adapter.safetensors")
    rows = [("linear probe", "head", []), ("full", "full", []), ("LoRA", "lora", []), ("SeRA", "sera", []),
            ("SiVA", "siva", []), ("Bone-col", "bone", ["--bone_grouping", "col"]),
            ("Bone-row", "bone", ["--bone_grouping", "row"]), ("VB-LoRA", "vblora", [])]
    res, sweep = {}, []
    for name, method, extra in rows:
        sizes = (["--bone_b", "16"] if method == "bone" else []) + (["--vblora_b", "32"] if method == "vblora" else [])

        def run(lr, seed):
            argv = ["--method", method, "--init_from", base_pt, "--classes", "5-9", *extra, *sizes,
                    *(lr_flags(lr) if lr else []), "--max_iters", str(V["ft_iters"]), "--batch_size", "32",
                    "--log_interval", "5", "--seed", str(seed), "--data", data, *shape]
            tag = name.replace(" ", "-") + (f"-lr{lr if isinstance(lr, str) else '-'.join(lr)}" if lr and args.sweep else "")
            out = os.path.join(args.out_dir, "vit-sweep" if args.sweep else "vit", f"{tag}-s{seed}")
            t0 = time.time()
            r = cached_run(train_vit.main, argv, out, deps=[base["key"]], analyse=ANALYSE.get(method))
            r.update(out=out, seconds=time.time() - t0)
            return r

        if args.sweep and method != "head":  # validation accuracy, mean over the seeds (one split is noisy)
            grid, ok = bracket(VIT_SWEEP[method], lambda lr: -mean(run(lr, s)["test_acc"] for s in seeds))
            sweep += [(name, lr, -v, ok) for lr, v in grid]
            print(f"ViT sweep {name}: " + ", ".join(f"{lr} {-100 * v:.1f}%" for lr, v in grid))
            continue
        for seed in seeds:
            r = run(None if q or method == "head" else VIT_LR.get(name, VIT_LR.get(method)), seed)
            res.setdefault(name, []).append(r)
            print(f"ViT {name} seed {seed}: test accuracy {100 * r['test_acc']:.1f}% ({r['seconds']:.0f}s)")
    return V, base, res, sweep


def sweep_report(gpt2_sweep, vit_sweep, seeds):
    """The grids, every held-out figure and each pick; a pick whose grid could not be extended is flagged."""
    md = ["# Learning-rate sweep (held-out data only)", "",
          f"GPT-2: dev loss, seed {seeds[0]} (lower is better). ViT: accuracy on the validation split, the last 50 "
          f"training images of each class, never trained on, mean over seeds {', '.join(map(str, seeds))} (higher is "
          "better). Each grid starts from the script defaults and a x5 step and grows by x5 past whichever end holds "
          "the best, until the best has a worse neighbour on each side.", "",
          "| side | method | lr | held-out metric | pick |", "| --- | --- | --- | ---: | --- |"]
    picks = []
    for side, rows, better, show in (("GPT-2", gpt2_sweep, min, "{:.4f}"), ("ViT", vit_sweep, max, "{:.1%}")):
        for n in dict.fromkeys(n for n, *_ in rows):
            grid = [(lr, v, ok) for m, lr, v, ok in rows if m == n]
            pick = better(grid, key=lambda g: g[1])
            picks.append(f"{side} {n} {pick[0]}" + ("" if pick[2] else " (at the edge: the next x5 step left the range)"))
            md += [f"| {side} | {n} | {lr} | {show.format(v)} | {'**pick**' if lr == pick[0] else ''} |"
                   for lr, v, _ in grid]
    return md + ["", "Picks: " + "; ".join(picks), ""]


def main():
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sides = [s for s in ("gpt2", "vit") if args.only in ("both", s)]
    t_all, load0 = time.time(), os.getloadavg()
    if args.device == "cpu":
        keep_freed_memory()
    os.makedirs(args.out_dir, exist_ok=True)
    paths = prepare_data(args, sides)
    print(f"data ready in {time.time() - t_all:.0f}s: {os.path.join(args.out_dir, 'data')}")
    q, dev = args.quick, ["--device", args.device]
    md = [f"# nanopeft mini-reproduction{' (--quick: checks the pipeline only)' if q else ''}", ""]
    analysis, panels, points, times, gpt2_sweep, vit_sweep = [], {}, {}, {}, [], []

    if "gpt2" in sides:
        t0 = time.time()
        G, base, res, gpt2_sweep, n_mrs, ref_words = gpt2_side(args, paths, seeds, q, dev)
        times["GPT-2"] = time.time() - t0
        if not args.sweep:
            zs, full = mean(r["dev_loss"] for r in res["zero-shot"]), mean(r["dev_loss"] for r in res["full"])
            md += [f"## GPT-2 on E2E: a {G['n_layer']}-layer, {G['n_embd']}-wide GPT-2 pretrained here on the E2E "
                   f"training references ({G['pre_iters']} steps of {G['pre_batch']}x128 tokens, "
                   f"{base['train_time']:.0f}s, dev LM loss {base['dev_loss']:.3f}), then {G['ft_iters']} "
                   f"fine-tuning steps of batch 8 per method", "",
                   f"Mean over seeds {' and '.join(map(str, seeds))}. Dev loss: plain cross-entropy on "
                   f"{8 * G['dev']} dev examples; gap closed: the share of the zero-shot -> full fine-tuning dev-loss "
                   f"gap. BLEU, ROUGE-L (x100) and slot accuracy (% of outputs stating the MR's name, and its near "
                   f"where it has one, verbatim): beam {G['beam']} on {n_mrs} test MRs drawn at random from the "
                   f"whole test set. Words: mean words per output (the references: {fmt(ref_words, '.1f')}). "
                   f"Time: training only, per seed.", "",
                   "| method | trainable | stored | dev loss | gap closed | BLEU | ROUGE-L | name | near | words | "
                   "time (s) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for name, rs in res.items():
                dl = mean(r["dev_loss"] for r in rs)
                s = {k: mean(r["slots"].get(k) for r in rs) for k in ("name", "near")}
                md.append(f"| {name} | {rs[0]['n_trainable']:,} | {rs[0]['n_stored']:,} | {dl:.3f} | "
                          f"{fmt(gap_closed(dl, zs, full) if zs != full else None, '.0%')} | "
                          f"{fmt(mean(r['scores'].get('BLEU') for r in rs), '.2f', 100)} | "
                          f"{fmt(mean(r['scores'].get('ROUGE_L') for r in rs), '.2f', 100)} | "
                          f"{fmt(s['name'], '.0%')} | {fmt(s['near'], '.0%')} | {fmt(mean(r['words'] for r in rs), '.1f')} | "
                          f"{fmt(mean(r['train_time'] for r in rs), '.0f')} |")
                analysis += [f"GPT-2 {name} seed {sd}: {r['analysis']}" for sd, r in zip(seeds, rs) if r["analysis"]]
                if name != "zero-shot":
                    points.setdefault("GPT-2 on E2E", ("dev-loss gap closed (%)", {}, {}))[1][name] = (
                        rs[0]["n_stored"], 100 * gap_closed(dl, zs, full) if zs != full else 0.0)
            md += ["", "Per seed (dev loss, BLEU, name %):", ""] + [
                f"- {name}: " + "; ".join(f"seed {sd}: {r['dev_loss']:.3f}, {fmt(r['scores'].get('BLEU'), '.2f', 100)}, "
                                         f"{fmt(r['slots'].get('name'), '.0%')}" for sd, r in zip(seeds, rs))
                for name, rs in res.items()]
            if len(res["SeRA"]) > 1:
                analysis.append("GPT-2 " + sera_similarity(train_gpt2, [r["out"] for r in res["SeRA"]]))
            panels["GPT-2 base: pretraining"] = {"train": base["curve"], "dev": base.get("dev_curve", [])}
            panels["GPT-2 on E2E: train loss (mean over seeds)"] = {
                n: mean_curve([r["curve"] for r in rs]) for n, rs in res.items() if n != "zero-shot"}
            dev_curves = {n: mean_curve([r["dev_curve"] for r in rs]) for n, rs in res.items() if n != "zero-shot"}
            panels["GPT-2 on E2E: dev loss (mean over seeds)"] = dev_curves
            md += ["", "Dev loss during fine-tuning (mean over seeds), and its change over the last interval:",
                   ""] + [f"- {n}: " + ", ".join(f"step {s} {v:.3f}" for s, v in c) +
                          (f"; last {c[-1][0] - c[-2][0]} steps {c[-1][1] - c[-2][1]:+.3f}" if len(c) > 1 else "")
                          for n, c in dev_curves.items()]
            md.append("")

    if "vit" in sides:
        t0 = time.time()
        V, base, res, vit_sweep = vit_side(args, paths, seeds, q, dev)
        times["ViT"] = time.time() - t0
        if not args.sweep:
            md += [f"## ViT on CIFAR-10: a {V['n_layer']}-layer, {V['n_embd']}-wide ViT pretrained here on classes 0-4 "
                   f"({V['pre_iters']} steps of 64, {base['train_time']:.0f}s, test accuracy "
                   f"{100 * base['test_acc']:.1f}%), adapted to classes 5-9 with {V['ft_iters']} steps of 32", "",
                   f"Mean over seeds {' and '.join(map(str, seeds))} (each seed in brackets). Accuracy on the "
                   f"{PER_CLASS[1] * 5} test images of classes 5-9; trainable without the head (+ the head's count); "
                   "time: training only, per seed.", "",
                   "| method | trainable (+head) | stored | test accuracy (%) | time (s) |",
                   "| --- | ---: | ---: | ---: | ---: |"]
            probe = mean(r["test_acc"] for r in res["linear probe"])
            for name, rs in res.items():
                acc = mean(r["test_acc"] for r in rs)
                each = " / ".join(f"{100 * r['test_acc']:.1f}" for r in rs)
                md.append(f"| {name} | {rs[0]['n_trainable']:,} (+{rs[0]['n_head']:,}) | {int(rs[0]['n_stored']):,} | "
                          f"{100 * acc:.1f} ({each}) | "
                          f"{fmt(mean(r['train_time'] for r in rs), '.0f')} |")
                analysis += [f"ViT {name} seed {sd}: {r['analysis']}" for sd, r in zip(seeds, rs) if r["analysis"]]
                if name != "linear probe":
                    points.setdefault("ViT on CIFAR-10 5-9", ("test accuracy (%)", {}, {"linear probe": 100 * probe}))[
                        1][name] = (max(int(rs[0]["n_stored"]), 1), 100 * acc)
            if len(res["SeRA"]) > 1:
                analysis.append("ViT " + sera_similarity(train_vit, [r["out"] for r in res["SeRA"]]))
            panels["ViT base: pretraining (train loss)"] = {"train": base["curve"]}
            panels["ViT on CIFAR-10 5-9: train loss (mean over seeds)"] = {
                n: mean_curve([r["curve"] for r in rs]) for n, rs in res.items()}
            md.append("")

    if args.sweep:
        md = sweep_report(gpt2_sweep, vit_sweep, seeds)
        name = "sweep.md"
    else:
        md += ["## The papers' analyses on the adapted models", "", *[f"- {a}" for a in analysis], ""]
        md += figures(args.out_dir, panels, points)
        name = "results.md"
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    if args.device.startswith("cuda"):
        cpu += f", GPU {torch.cuda.get_device_name(args.device)}"
    md += ["", f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
           f"device {args.device}. Command: `python reproduce.py {' '.join(os.sys.argv[1:])}`. Wall time "
           f"{(time.time() - t_all) / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f}' for k, v in times.items())}; cached "
           f"rows count as zero). Load average at start / end: {load0[0]:.1f} / {os.getloadavg()[0]:.1f}."]
    text = "\n".join(md) + "\n"
    with open(os.path.join(args.out_dir, name), "w") as f:
        f.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
