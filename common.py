"""What the two training scripts share, spelled one way (nanochat's common.py and checkpoint_manager.py): fetching,
the method registry, runs (the --out_dir guard, checkpoints, resume) and DDP, each under its heading below.
"""
import argparse
import inspect
import json
import os
import re
import socket
from contextlib import nullcontext

import safetensors
import safetensors.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bone
import interop
import lora
import sera
import siva
import vblora

# -----------------------------------------------------------------------------
# Fetching: a local file or folder named by a flag is used as it is; otherwise every cache first, and one probe
# of the network on the first need, so an offline run never sits through a library's retries

HUB_HOST = "huggingface.co"


class Missing(SystemExit):
    """An input neither on disk nor downloadable; the text names it, why, and the flag that replaces it.
    A SystemExit, so a script that meets one outside fetch_all still ends with its text, not a traceback."""


def network_ok(host=HUB_HOST, timeout=3.0):
    """One quick probe: can a TCP connection to the Hugging Face Hub be opened?"""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class Online:
    """network_ok(), probed on the first call only and remembered in .ok."""
    ok = None

    def __call__(self):
        self.ok = network_ok() if self.ok is None else self.ok
        return self.ok


def fetch_all(jobs):
    """{name: job(online)} -> {name: result}. Every job runs; the Missing ones end in one SystemExit naming all."""
    online, got, missing = Online(), {}, []
    for name, job in jobs.items():
        try:
            got[name] = job(online)
        except Missing as e:
            missing.append(f"  {e.code}")
    if missing:
        cause = f"no network (could not reach {HUB_HOST})" if online.ok is False else "a download failed"
        raise SystemExit(f"error: {cause}; these could not be fetched:\n" + "\n".join(missing))
    return got


def unreachable(e):
    """True when e, or an exception it was raised from, is a failed connection or a timeout (the
    requests, httpx and huggingface_hub ones included, by their class names)."""
    while e is not None:
        if isinstance(e, (ConnectionError, TimeoutError)) or re.search("Connect|Timeout|Offline", type(e).__name__):
            return True
        e = e.__cause__ or e.__context__
    return False


def why(e):
    """An exception in one line: its class and its text (a state dict's many mismatches too), cut at 300 characters."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


# -----------------------------------------------------------------------------
# Methods: name -> (config from the run's flags, apply, adapter state dict, load)

METHODS = {
    "lora": (lambda a: lora.LoRAConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout),
             lora.apply_lora, lora.lora_state_dict, lora.load_lora_state_dict),
    "sera": (lambda a: sera.SeRAConfig(r=a.sera_r, split=a.sera_split, alpha=a.sera_alpha, dropout=a.sera_dropout),
             sera.apply_sera, sera.sera_state_dict, sera.load_sera_state_dict),
    "siva": (lambda a: siva.SiVAConfig(perc=a.siva_perc),
             siva.apply_siva, siva.siva_state_dict, siva.load_siva_state_dict),
    "bone": (lambda a: bone.BoneConfig(b=a.bone_b, grouping=a.bone_grouping),
             bone.apply_bone, bone.bone_state_dict, bone.load_bone_state_dict),
    "vblora": (lambda a: vblora.VBLoRAConfig(r=a.vblora_r, b=a.vblora_b, h=a.vblora_h, k=a.vblora_k),
               vblora.apply_vblora, lambda m: vblora.vblora_state_dict(m, compact=True),  # what a user ships
               vblora.load_vblora_state_dict),
}
ADAPTER_PREFIXES = ("lora_", "sera_", "siva_", "bone_", "vblora_")
METHOD_FLAGS = {  # flag -> (type, help); a script's METHOD_DEFAULTS fill in the ones left unset
    "targets": (str, "comma list of Linear names to adapt, suffix match"),
    "lr": (float, "learning rate of the adapter (of every weight for full)"),
    "lora_r": (int, "LoRA rank"),
    "lora_alpha": (float, "LoRA scale alpha/r"),
    "lora_dropout": (float, "LoRA dropout on the adapter input"),
    "sera_r": (int, "SeRA mixing width r"),
    "sera_split": (int, "SeRA segments (unset: = --sera_r, the paper's default)"),
    "sera_alpha": (float, "SeRA scale alpha/r"),
    "sera_dropout": (float, "SeRA dropout on the adapter input"),
    "siva_perc": (float, "SiVA: share of the variance (sum of sigma^2) left frozen"),
    "bone_b": (int, "Bone block size; must divide in and out"),
    "bone_grouping": (str, "Bone-col (its paper's default) or Bone-row"),
    "vblora_r": (int, "VB-LoRA rank"),
    "vblora_b": (int, "VB-LoRA sub-vector length; must divide the width"),
    "vblora_h": (int, "VB-LoRA vectors in the bank"),
    "vblora_k": (int, "VB-LoRA top-k vectors per sub-vector"),
    "vblora_bank_lr": (float, "VB-LoRA vector bank lr"),
    "vblora_logits_lr": (float, "VB-LoRA logits lr"),
}


MAX_PARAMS = 2 ** 33


def check_size(path, n_layer, n_embd, mlp_dim, n_embeddings=0):
    """Refuse, before allocating it, a transformer that the header of `path` describes beyond MAX_PARAMS parameters."""
    n = n_layer * (4 * n_embd + 2 * mlp_dim) * n_embd + n_embeddings * n_embd  # attention 4 C², MLP 2 C·mlp
    if n > MAX_PARAMS:
        raise SystemExit(f"error: {path}: its header's config makes a model of {n:.3g} parameters; expected at most "
                         f"{MAX_PARAMS:.3g}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # a None default means "per method" or "off": the help says which
        return action.help if action.default is None else super()._get_help_string(action)


def add_method_args(p, defaults, default_method):
    """--method and the method flags, each unset by default; the epilog lists what each method fills in."""
    g = p.add_argument_group("method (an unset flag takes the method's default, listed below)")
    g.add_argument("--method", default=default_method, choices=list(defaults), help="fine-tuning method")
    g.add_argument("--export", nargs=2, metavar=("peft|lora", "DIR"), default=None,
                   help="after training, also write the adapter for the Hugging Face model: PEFT's format (LoRA, "
                        "VB-LoRA, Bone-col) or any method's ΔW as plain LoRA (exact, else SVD with its error printed)")
    for flag, (type_, help_) in METHOD_FLAGS.items():
        choices = ["col", "row"] if flag == "bone_grouping" else None
        g.add_argument(f"--{flag}", type=type_, default=None, choices=choices, help=help_ + " (per method)")
    p.epilog = "per-method defaults, for the flags left unset:\n" + "\n".join(
        f"  {m:7s} " + (" ".join(f"{k}={v}" for k, v in d.items()) or "(nothing is trained)")
        for m, d in defaults.items())


def fill_method_defaults(args, defaults):
    """Every method flag left unset takes its method's default, then the method's config checks them; with a PEFT
    folder as --init_from, its config sets the method's targets and shapes instead (interop.init_from checks them)."""
    folder = interop.is_folder(args.init_from)
    for k, v in defaults[args.method].items():
        if getattr(args, k) is None and not (folder and k in interop.FOLDER_FLAGS):
            setattr(args, k, v)
    for k in ("lr", "vblora_bank_lr", "vblora_logits_lr"):
        if getattr(args, k) is not None and getattr(args, k) < 0:
            raise SystemExit(f"error: --{k} {getattr(args, k)}: must be >= 0")
    if args.export is not None and args.method not in METHODS:
        raise SystemExit(f"error: --export: --method {args.method} trains no adapter to export")
    if not folder and args.method in METHODS:
        try:
            METHODS[args.method][0](args)
        except ValueError as e:  # a constraint of the method's config, named with its values
            raise SystemExit(f"error: --method {args.method}: {e}")
    return args


def attach_method(model, args, layout=None, peft=None):
    """Freeze the model (all of it trains for --method full), then attach `peft` (a PEFT folder as read_peft
    returns it: its own shapes, mapped by `layout`) or the method on --targets."""
    model.requires_grad_(args.method == "full")
    try:
        if peft is not None:
            interop.load_peft(model, args.init_from, layout, peft)
        elif args.method in METHODS:
            config, apply, _, _ = METHODS[args.method]
            apply(model, config(args), args.targets.split(","))
    except ValueError as e:  # the folder's tensors; a target that matches nothing, a width the method cannot divide
        flag = f"--init_from {args.init_from}" if peft is not None else f"--method {args.method}"
        raise SystemExit(f"error: {flag}: {e}")


def adapter_state_dict(model, method):
    """What a user ships: the method's adapter tensors (VB-LoRA compact); full: every trained tensor but a
    classification head (saved on its own)."""
    if method in METHODS:
        return METHODS[method][2](model)
    if method == "full":
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")}
    return {}


def load_adapter_state_dict(model, method, sd, path="the adapter"):
    """Load what adapter_state_dict saved, strictly: every tensor must fit the model, none is dropped; a misfit is
    one line naming path."""
    if method == "none" and sd:
        raise SystemExit(f"error: {path}: --method none trains no tensor, but the file holds {len(sd)} "
                         f"({list(sd)[:3]})")
    try:
        if method in METHODS:
            METHODS[method][3](model, sd)
        else:
            extra = model.load_state_dict(sd, strict=False).unexpected_keys
            if extra:
                raise ValueError(f"tensors the model has not: {sorted(extra)[:4]}")
    except (ValueError, RuntimeError) as e:  # shapes, keys or dtypes that differ
        raise SystemExit(f"error: {path}: the tensors do not fit the model its header describes: "
                         f"{why(e)}")


def param_counts(model, method):
    """(trainable, stored, base model) parameters: the headline numbers of a PEFT method. Stored: what a user
    ships, VB-LoRA's in float32 equivalents of its top-k form."""
    n_base = sum(p.numel() for n, p in model.named_parameters() if not any(s in n for s in ADAPTER_PREFIXES))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_stored = (vblora.vblora_stored_param_count(model) if method == "vblora" else
                sum(t.numel() for t in adapter_state_dict(model, method).values()))
    return n_train, n_stored, n_base


# -----------------------------------------------------------------------------
# Runs: the out_dir guard, atomic checkpoints, resume

CKPT_KEYS = ("args", "step", "trainable", "optimizer", "rng")
# flags a resume may change in either script: they cannot alter the trained weights, only how long the run
# goes, what it prints, where it runs and what it decodes or evaluates afterwards
RESUME_MAY_CHANGE = {"max_iters", "epochs", "log_interval", "eval_interval", "eval_iters", "eval_batch_size",
                     "device", "compile", "resume", "overwrite", "out_dir", "beam", "eval_samples", "decode_batch",
                     "length_penalty", "no_repeat_ngram", "max_new_tokens", "sample", "adapter", "export"}


def hms(seconds):
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(step, total, loss, lr, rate, unit, t_start, start_step, now):
    """The log line of both scripts: step, loss, lr, throughput, elapsed, and the ETA at this call's pace."""
    eta = (now - t_start) / (step - start_step) * (total - step)
    return (f"step {step}/{total} | loss {loss:.4f} | lr {lr:.2e} | {rate:,.0f} {unit} | elapsed {hms(now - t_start)} "
            f"| eta {hms(eta)}")


def save_atomic(obj, path):
    """Write obj (bytes as they are, else torch.save) to path + ".tmp", fsync it, rename it over path, fsync the
    folder: a crash leaves the old or the new file, never a torn one."""
    with open(path + ".tmp", "wb") as f:
        f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adapter_bytes(meta, tensors, peft=None):
    """An adapter.safetensors file: the tensors, and `meta` (the run's flags, model config...) as JSON under "nanopeft"
    in the file's own header, so the two never part. A run from a PEFT folder (`peft`, as read_peft returned it) also
    stores the folder, its config in the header and its tensors under "peft.", so the run loads without it."""
    if peft is not None:
        meta = dict(meta, peft=peft["config"])
        tensors = {**tensors, **{f"peft.{k}": v for k, v in peft["tensors"].items()}}
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    return safetensors.torch.save(tensors, metadata={"nanopeft": json.dumps(meta)})


def read_safetensors(path):
    """(the "nanopeft" header as a dict, or None for a plain weights file; the tensors)."""
    with safetensors.safe_open(path, "pt") as f:
        header = (f.metadata() or {}).get("nanopeft")
        return (None if header is None else json.loads(header)), {k: f.get_tensor(k) for k in f.keys()}


def load_adapter(path, keys, methods):
    """{meta..., "adapter": tensors, "head": the "head."-prefixed ones, "peft"} from an adapter.safetensors (methods:
    the script's). Any fault is one line naming path and, in the header, the field."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise SystemExit(f"error: {path} is {'an empty file' if os.path.isfile(path) else 'not a file'}, not an "
                         f"adapter.safetensors")
    try:
        meta, tensors = read_safetensors(path)
    except Exception as e:  # truncated, not a safetensors file
        raise SystemExit(f"error: {path} is not a readable adapter.safetensors (truncated or another format): "
                         f"{why(e)}")
    missing = [k for k in keys if not isinstance(meta, dict) or k not in meta and k not in ("adapter", "head")]
    if missing:
        raise SystemExit(f"error: {path} is not a nanopeft adapter.safetensors: no {', '.join(missing)} in its header")

    def bad(field, value, expected):  # the header fields every loader reads, each checked for what it must hold
        raise SystemExit(f"error: {path}: its header's {field}={value!r}: expected {expected}")

    args = meta.get("args", {})
    if not isinstance(args, dict):
        bad("args", args, "an object of the run's flags")
    if args.get("method") not in methods:
        bad("args.method", args.get("method"), f"one of {', '.join(methods)}")
    for field in ("init_from", "targets"):
        if not isinstance(args.get(field), (str, type(None))):
            bad(f"args.{field}", args[field], "a string")
    if not isinstance(meta.get("config"), (dict, type(None))):
        bad("config", meta["config"], "an object of the model's config")
    peft = meta.get("peft")
    if peft is not None:  # the PEFT folder the run started from, checked as read_peft checks it
        try:
            peft = interop.check_peft(peft, {k[5:]: v for k, v in tensors.items() if k.startswith("peft.")},
                                      args.get("init_from"))
        except ValueError as e:
            raise SystemExit(f"error: {path}: {e}")
    return dict(meta, adapter={k: v for k, v in tensors.items() if not k.startswith(("head.", "peft."))},
                head={k[5:]: v for k, v in tensors.items() if k.startswith("head.")}, peft=peft)


def open_run(args, world_size, files=("ckpt.pt", "adapter.safetensors")):
    """The --out_dir guard. -> the checkpoint to resume (--resume), loaded as data only, or None for a new run; a
    folder that holds a run is refused unless --resume or --overwrite, and a resume whose flags would alter the run
    is refused naming each changed flag and both values."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume and --overwrite: pass one of them")
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: --resume: no checkpoint at {ckpt_path}")
        if os.path.getsize(ckpt_path) == 0:
            raise SystemExit(f"error: {ckpt_path} is an empty file, not a checkpoint (a save cut short?)")
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, a pickled payload
            raise SystemExit(f"error: {ckpt_path} is not a readable checkpoint (truncated or not a torch file): "
                             f"{why(e)}")
        missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:
            raise SystemExit(f"error: {ckpt_path} is not a nanopeft ckpt.pt: no {', '.join(missing)}")
        saved, new = ckpt["args"], vars(args)
        changed = [f"--{k} {saved.get(k)} -> {new.get(k)}" for k in sorted(set(saved) | set(new))
                   if k not in RESUME_MAY_CHANGE and saved.get(k) != new.get(k)]
        if changed:
            free = sorted(RESUME_MAY_CHANGE & set(new) - {"resume", "overwrite", "sample", "adapter", "export"})
            raise SystemExit(f"error: --resume: {', '.join(changed)} would alter the saved run; only "
                             f"{', '.join('--' + k for k in free)} may change (or start over with --overwrite)")
        if ckpt.get("world_size", 1) != world_size:
            raise SystemExit(f"error: --resume: {ckpt_path} was written by a run of {ckpt.get('world_size', 1)} "
                             f"process(es), this one has {world_size}: the global batch would change")
        return ckpt
    if not args.overwrite:
        for path in (os.path.join(args.out_dir, f) for f in files):
            if os.path.exists(path):
                raise SystemExit(f"error: {path} exists; pass --resume to continue that run or --overwrite to "
                                 f"start over")
    return None


def checkpoint(args, step, world_size, model, opt, device, **extra):
    """What --resume needs: the run's flags, the step, every trainable tensor, the optimizer and the RNG."""
    return dict(args=vars(args), step=step, world_size=world_size,
                trainable={n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                optimizer=opt.state_dict() if opt is not None else {},
                rng=dict(torch=torch.get_rng_state(),
                         cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None), **extra)


def restore(ckpt, path, model, opt, master, device, log=print):
    """Load a checkpoint's trainable tensors, optimizer and (on rank 0) RNG into this run; -> its step."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    extra, missing = sorted(set(ckpt["trainable"]) - trainable), sorted(trainable - set(ckpt["trainable"]))
    if extra or missing:
        raise SystemExit(f"error: --resume: {path} holds other trainable tensors than this run: only in "
                         f"the checkpoint {extra[:4]}, only in this run {missing[:4]}")
    try:
        model.load_state_dict(ckpt["trainable"], strict=False)
        if opt is not None:
            opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError) as e:  # shapes or parameter groups that differ
        raise SystemExit(f"error: --resume: {path} does not fit this model: {why(e)}")
    if master:  # the other ranks keep their seed offset
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    log(f"resumed from {path} at step {ckpt['step']}")
    return ckpt["step"]


# -----------------------------------------------------------------------------
# DDP (nanoGPT's pattern) and the device

def setup_ddp(device):
    """-> (ddp, rank, world_size, torch.device). Under torchrun (RANK set) join the process group: nccl on
    CUDA, each process on cuda:LOCAL_RANK; gloo on CPU. --device auto: CUDA when there is one."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1, torch.device(device)
    cuda = device.startswith("cuda")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    return True, rank, world_size, device


def wrap_ddp(model, device):
    """DistributedDataParallel. Every rank built the model identically and its buffers (SiVA's frozen bases)
    never change, so none is re-sent each forward (the flag's name differs before torch 2.13)."""
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)


def end_ddp(ddp):
    """Every rank waits for the others, then leaves the process group. The barrier narrows a race in torch it cannot
    close: gloo's threads outlive destroy_process_group, and one that frees a tensor at shutdown aborts the process."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def grad_sync(model, ddp, last):
    """All-reduce the gradients on the last micro-batch of a step only: no_sync() on the others."""
    return model.no_sync() if ddp and not last else nullcontext()


def autocast(device):
    """bf16 autocast on CUDA; nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
