"""Fine-tune a ViT for image classification with any nanopeft method (papers: siva §4.1, sera §4.1).

    python train_vit.py --method siva --dataset cifar10                        # ViT-B/16 in21k, 10 epochs
    python train_vit.py --method lora --init_from vit-large --dataset pets
    python train_vit.py --method bone --init_from scratch --n_layer 2 --n_embd 256 --n_head 4 --patch_size 4 \\
        --image_size 32 --data cifar10.npz --max_iters 10   # offline: an .npz or a folder
    torchrun --standalone --nproc_per_node=4 train_vit.py --method lora --dataset cifar10   # 4 GPUs, DDP

The loop a reader forks; the model is in model_vit.py, the image data and augmentation in images.py, and what
this script shares with train_gpt2.py (fetching, methods, checkpoints, resume, DDP) in common.py.

Choices made where the papers are silent:
- --classes 0-4 (or 5,6,7,8,9, or a mix: 0-2,7): train and test on those classes only, relabelled
  0..C-1 in the order given, their names kept (pretrain on some classes, adapt to others).
- The head is new, zero-initialised (as in the ViT paper's fine-tuning) and always trained, at its own
  --head_lr. `--method head` is the papers' linear probe (LP); `--method none` trains nothing and
  only evaluates --init_from (useful when its classifier fits the classes); to evaluate a fine-tuned
  run, rebuild it with load_finetuned(path to its adapter.safetensors).
- Per-method defaults for ViT (listed by --help). From the papers' text: targets q_proj, v_proj (siva §4.1,
  sera §4.1); LoRA r=16 and SiVA perc=0.95 (siva §4.1, ViT-B/L); SeRA r=16 with split = r (sera §4.1,
  ViT-L "easy" mode); Bone b=64 (its paper's default). Ours: LoRA and SeRA alpha=16 (scale 1); VB-LoRA
  r=4, h=256, k=2 with b=256 (its GPT-2 setting; 256 divides 768 and 1024). Learning rates are not in our
  copies of the papers; the per-method lr defaults are untuned starting points.
- AdamW, linear warmup (--warmup_iters, default a tenth of the run) then cosine decay to 0, gradient
  clipping; bf16 autocast on CUDA. An epoch is len(train) // (global batch) steps: the last incomplete
  global batch is dropped.
- The crop and flip of a micro-batch are drawn from a generator seeded by (--seed, its index), so they do
  not depend on the number of processes, and a resumed run draws them again as it would have.
- Multi-GPU (torchrun): one optimizer step takes --grad_accum micro-batches of --batch_size on each of the
  N processes; micro-batch i of a step goes to process i % N, so N processes with --grad_accum G give the
  same steps as one with --grad_accum G*N. Only rank 0 logs, evaluates and saves.
- adapter.safetensors holds the method's adapter state dict (the backbone for `full`, compact top-k for
  VB-LoRA) and the head ("head."), and in its header {"args", "config", "classes", "test_acc"};
  load_finetuned(path) rebuilds the model from it (a scratch backbone from --seed). ckpt.pt holds what
  --resume needs. Both are written atomically. --export peft|lora DIR writes the adapter and head for Hugging
  Face's ViTForImageClassification (transformers >= 5 module names; model_vit.vit_layout also has the older ones);
  --init_from takes a PEFT folder too.
"""
import argparse
import math
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import (HelpFormatter, adapter_bytes, add_method_args, adapter_state_dict, attach_method, autocast,
                    check_size, checkpoint, end_ddp, fetch_all, fill_method_defaults, grad_sync, load_adapter,
                    load_adapter_state_dict, open_run, param_counts, progress_line, restore, save_atomic,
                    setup_ddp, why, wrap_ddp)
from images import DATA_LAYOUT, DATASETS, load_data, parse_classes, preprocess
from interop import base_of, check_export, export_adapter, init_from
from model_vit import HUB_MODELS, ViT, ViTConfig, build_model, read_checkpoint, vit_layout

QV = "q_proj,v_proj"  # both papers adapt q and v on the ViT
METHOD_DEFAULTS = {
    "none": dict(lr=0.0),  # evaluate --init_from as it is
    "full": dict(lr=2e-5),
    "head": dict(lr=0.0),  # the linear probe: the head alone, at --head_lr
    "lora": dict(targets=QV, lora_r=16, lora_alpha=16.0, lora_dropout=0.0, lr=5e-3),
    "sera": dict(targets=QV, sera_r=16, sera_alpha=16.0, sera_dropout=0.0, lr=5e-3),
    "siva": dict(targets=QV, siva_perc=0.95, lr=5e-3),
    "bone": dict(targets=QV, bone_b=64, bone_grouping="col", lr=1e-4),
    "vblora": dict(targets=QV, vblora_r=4, vblora_b=256, vblora_h=256, vblora_k=2, vblora_bank_lr=1e-3,
                   vblora_logits_lr=1e-2),
}
ADAPTER_KEYS = ("args", "adapter", "head", "classes")

# -----------------------------------------------------------------------------
# Flags


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--init_from", default="vit-base",
                   help="vit-base | vit-large (Google in21k on the Hub) | a Hub repo id | a local .safetensors/.bin/"
                        ".pt or folder | a full fine-tune's adapter.safetensors | a PEFT folder | scratch")
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
    add_method_args(p, METHOD_DEFAULTS, default_method="lora")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10, help="the papers train at most 10")
    g.add_argument("--max_iters", type=int, default=None, help="cap on optimizer steps (default: none, --epochs)")
    g.add_argument("--batch_size", type=int, default=64, help="training images per micro-batch, per process")
    g.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches per optimizer step, per process: a step sees batch_size * grad_accum * "
                        "processes images; N processes with G give the steps of 1 process with G*N")
    g.add_argument("--eval_batch_size", type=int, default=256, help="test images per forward")
    g.add_argument("--head_lr", type=float, default=5e-3, help="lr of the classification head, every method")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="on matrices, not on biases/norms/VB-LoRA")
    g.add_argument("--warmup_iters", type=int, default=None, help="linear warm-up steps (default: a tenth of the run)")
    g.add_argument("--grad_clip", type=float, default=1.0, help="0 disables")
    g.add_argument("--seed", type=int, default=0, help="scratch init, adapter init, data order and augmentation")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (bf16 autocast on CUDA; under "
                   "torchrun each process takes cuda:LOCAL_RANK)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--log_interval", type=int, default=20, help="steps between log lines")
    g.add_argument("--eval_interval", type=int, default=0,
                   help="steps between test evaluations (and saves); 0: at each epoch's end. Always at the end")
    g.add_argument("--out_dir", default="out-vit", help="adapter.safetensors and ckpt.pt go here")
    g.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt.pt; only --max_iters, "
                   "--epochs, logging, eval and device flags may differ from its run")
    g.add_argument("--overwrite", action="store_true", help="start over even if out_dir holds a run")
    args = p.parse_args(argv)
    check_args(args)
    return fill_method_defaults(args, METHOD_DEFAULTS)


def check_args(args):
    """Every bad flag, one `error:` line each, before anything is loaded."""
    bad = [f"--{k} {getattr(args, k)}: must be >= 1" for k in
           ("batch_size", "grad_accum", "eval_batch_size", "log_interval", "epochs", "image_size", "patch_size",
            "n_layer", "n_head", "n_embd") if getattr(args, k) < 1]
    bad += [f"--{k} {getattr(args, k)}: must be >= 0" for k in
            ("max_iters", "eval_interval", "head_lr", "weight_decay", "warmup_iters", "grad_clip")
            if getattr(args, k) is not None and getattr(args, k) < 0]
    if args.n_head >= 1 and args.n_embd % args.n_head:
        bad.append(f"--n_head {args.n_head} must divide --n_embd {args.n_embd}")
    if args.patch_size >= 1 and args.image_size % args.patch_size:
        bad.append(f"--patch_size {args.patch_size} must divide --image_size {args.image_size}")
    if not 0 < args.min_crop <= 1:
        bad.append(f"--min_crop {args.min_crop} must lie in (0, 1]")
    if args.classes:
        try:
            parse_classes(args.classes)
        except ValueError as e:
            bad.append(f"--classes {args.classes}: {e}")
    if bad:
        raise SystemExit("\n".join("error: " + b for b in bad))


# -----------------------------------------------------------------------------
# Parameter groups, schedule, evaluation, reload


def param_groups(model, args):
    """AdamW groups (each named, with its base_lr): head at --head_lr, VB-LoRA bank at --vblora_bank_lr and
    logits at --vblora_logits_lr, the rest (adapter, or the backbone for full) at --lr; weight decay on
    matrices only and never on VB-LoRA's tensors."""
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


def lr_factor(step, warmup, total):
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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


def load_finetuned(path, device="cpu"):
    """Rebuild a fine-tuned model from adapter.safetensors: a full fine-tune from its saved config and tensors;
    else the backbone from its --init_from (or --seed for scratch) with its saved n_head, the method
    applied as in training, then the adapter and the head loaded."""
    blob = load_adapter(path, ADAPTER_KEYS, METHOD_DEFAULTS)
    args = argparse.Namespace(**blob["args"])
    saved_cfg = blob.get("config")
    torch.manual_seed(args.seed)
    try:  # an edited header: fields ViTConfig has not, sizes ViT refuses, tensors that do not fit, too big a model
        if args.method == "full" and saved_cfg:
            cfg = ViTConfig(**saved_cfg)
            check_size(path, cfg.n_layer, cfg.n_embd, cfg.mlp_dim)
            model = ViT(cfg)
            model.load_state_dict({**blob["adapter"], **{f"head.{k}": v for k, v in blob["head"].items()}})
            return model.to(device).eval()
        weights = None if args.init_from == "scratch" else read_checkpoint(base_of(args.init_from, blob["peft"]))
        model = build_model(args, len(blob["classes"]), weights, n_head=saved_cfg and saved_cfg["n_head"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {path}: its header's config {saved_cfg} does not make this run's ViT: "
                         f"{why(e)}")
    attach_method(model, args, vit_layout, blob["peft"])
    load_adapter_state_dict(model, args.method, blob["adapter"], path)
    model.head.load_state_dict(blob["head"])
    return model.to(device).eval()


def load_inputs(args, base, ddp, master, device, log):
    """(base weights, data on the device), every download tried before any missing one is reported. Under
    DDP rank 0 downloads first; the others then read its cache."""
    t0 = time.time()
    if ddp and not master:
        dist.barrier()
    got = fetch_all({"weights": lambda online: None if args.init_from == "scratch" else
                     read_checkpoint(base, online),
                     "data": lambda online: load_data(args, online)})
    if ddp and master:
        dist.barrier()
    data = {k: v.to(device) if torch.is_tensor(v) else v for k, v in got["data"].items()}
    log(f"data: {len(data['x_train'])} train / {len(data['x_test'])} test images, {len(data['classes'])} classes, "
        f"cached at {tuple(data['x_train'].shape[2:])} uint8 ({time.time() - t0:.1f}s)")
    return got["weights"], data


def save_run(args, step, world_size, model, opt, device, classes, acc, peft=None):
    """ckpt.pt (to resume) and adapter.safetensors (to use), each written atomically."""
    save_atomic(checkpoint(args, step, world_size, model, opt, device, test_acc=acc),
                os.path.join(args.out_dir, "ckpt.pt"))
    tensors = {**adapter_state_dict(model, args.method), **{f"head.{k}": v for k, v in model.head.state_dict().items()}}
    meta = dict(args=vars(args), config=asdict(model.cfg), classes=classes, test_acc=acc)
    save_atomic(adapter_bytes(meta, tensors, peft), os.path.join(args.out_dir, "adapter.safetensors"))


# -----------------------------------------------------------------------------
# The script


def main(argv=None):
    """The script; returns {model, test_acc, step, n_trainable (without the head), n_head, n_stored, train_loss
    (the last logged), curve [(step, loss)] per log line, train_time (s, evaluation excluded), img_per_s} for
    tests, notebooks and reproduce.py."""
    # ---- setup: flags, processes, the out_dir guard
    args = get_args(argv)
    ddp, rank, world_size, device = setup_ddp(args.device)
    peft, base = init_from(args)  # a PEFT folder as --init_from, read once; the base weights' path
    ckpt = open_run(args, world_size)
    result = train(args, peft, base, ckpt, ddp, rank, world_size, device)
    end_ddp(ddp)
    return result


def train(args, peft, base, ckpt, ddp, rank, world_size, device):
    master = rank == 0  # logs, evaluates and saves
    log = print if master else (lambda *a, **k: None)
    ctx = autocast(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    # ---- data and base weights
    weights, data = load_inputs(args, base, ddp, master, device, log)
    x_train, y_train, x_test, y_test = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    classes = data["classes"]
    global_batch = args.batch_size * args.grad_accum * world_size
    steps_per_epoch = len(x_train) // global_batch
    if steps_per_epoch == 0 and args.method != "none":
        raise SystemExit(f"error: --batch_size {args.batch_size} x --grad_accum {args.grad_accum} x {world_size} "
                         f"process(es) = {global_batch} images per step, more than the {len(x_train)} training images")

    # ---- model and method; the same seed on every rank, so all start identical
    torch.manual_seed(args.seed)  # before build_model: a scratch backbone is rebuilt from the seed on reload
    model = build_model(args, len(classes), weights, classes=classes).to(device)
    attach_method(model, args, vit_layout, peft)  # a PEFT folder's adapter: stored with the run's
    check_export(args, model, vit_layout)  # before training: an adapter PEFT cannot hold is refused now
    model.head.requires_grad_(args.method != "none")
    groups = param_groups(model, args)
    torch.manual_seed(args.seed + rank)  # dropout differs across ranks
    n_head = sum(p.numel() for p in model.head.parameters() if p.requires_grad)
    n_train, n_stored, _ = param_counts(model, args.method)
    log(f"method {args.method}: {n_train - n_head:,} trainable parameters without the head (as the papers "
        f"count), {n_train:,} with it; {n_stored:,.0f} stored in adapter.safetensors; "
        f"model {sum(p.numel() for p in model.parameters()):,}")

    # ---- optimizer and schedule
    max_steps = 0 if args.method == "none" else args.epochs * steps_per_epoch
    max_steps = max_steps if args.max_iters is None else min(max_steps, args.max_iters)
    warmup = max_steps // 10 if args.warmup_iters is None else args.warmup_iters
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=device.type == "cuda") if n_train else None

    # ---- resume
    step = 0 if ckpt is None else restore(ckpt, os.path.join(args.out_dir, "ckpt.pt"), model, opt, master, device, log)
    train_model = wrap_ddp(model, device) if ddp and opt is not None else model
    train_model = torch.compile(train_model) if args.compile else train_model
    eval_model = torch.compile(model) if args.compile else model

    def evaluate_and_save(when):
        acc = evaluate(eval_model, x_test, y_test, args, ctx)
        log(f"{when}: test accuracy {100 * acc:.2f}% ({len(x_test)} images)")
        save_run(args, step, world_size, model, opt, device, classes, acc, peft)
        return acc

    # ---- the training loop
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
        for group in opt.param_groups:  # the schedule
            group["lr"] = group["base_lr"] * lr_factor(step, warmup, max_steps)
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):  # forward and backward over the step's micro-batches
            i = (j * args.grad_accum + micro) * world_size + rank  # micro-batch i of the epoch: ranks interleave
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            aug = torch.Generator().manual_seed((args.seed * 1_000_003 + epoch * 100_003 + i) % 2 ** 63)
            xb = preprocess(x_train[idx], args.image_size, train=True, min_scale=args.min_crop, generator=aug)
            with grad_sync(train_model, ddp, last=micro == args.grad_accum - 1):
                with ctx:
                    logits = train_model(xb)
                loss = F.cross_entropy(logits.float(), y_train[idx]) / args.grad_accum  # DDP averages over ranks
                loss.backward()
            loss_sum += loss.detach()
        if args.grad_clip > 0:  # the update
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_interval == 0 or step == max_steps:  # the log line: the global batch's loss
            if ddp:
                dist.all_reduce(loss_sum)  # a sum: gloo has no average
            loss_val, now = float(loss_sum) / world_size, time.time()  # float() waits for the device: time after it
            curve.append((step, loss_val))
            train_loss, seen, train_time = loss_val, seen + (step - step_log) * global_batch, train_time + now - t_log
            lr = next((g for g in opt.param_groups if g["name"] != "head"), opt.param_groups[0])["lr"]
            rate = (step - step_log) * global_batch / (now - t_log)  # over this interval
            log(progress_line(step, max_steps, loss_val, lr, rate, "img/s", t_start, step0, now))
            t_log, step_log = now, step
        at_eval = step % steps_per_epoch == 0 or step == max_steps or \
            (args.eval_interval and step % args.eval_interval == 0)
        if master and at_eval:  # test accuracy and a checkpoint
            acc = evaluate_and_save(f"epoch {epoch + 1}" if step % steps_per_epoch == 0 else f"step {step}")
            t_log = time.time()  # images/s counts training only

    # ---- save
    if master and acc is None:  # nothing trained in this call: method none, or a finished run resumed
        acc = evaluate_and_save("no training step")
    log(f"saved {args.out_dir}/adapter.safetensors and ckpt.pt")
    if master and args.export:  # for Hugging Face's ViTForImageClassification: the head is its classifier
        export_adapter(args, model, vit_layout, None if args.init_from == "scratch" else
                       HUB_MODELS.get(args.init_from, base),
                       modules_to_save={"classifier": model.head.state_dict()}, log=log)
    return {"model": model, "test_acc": acc, "step": step, "n_trainable": n_train - n_head, "n_head": n_head,
            "n_stored": n_stored, "train_loss": train_loss, "curve": curve, "train_time": train_time,
            "img_per_s": seen / train_time if train_time else None}


if __name__ == "__main__":
    main()
