"""Fine-tune GPT-2 on the E2E NLG Challenge with any nanopeft method, decode with beam search, score.

    python train_gpt2.py --method vblora                  # GPT-2 Medium, E2E from the Hub, paper recipe
    python train_gpt2.py --method lora --data_dir e2e-dataset --bpe_dir gpt2-bpe   # offline: local files
    python train_gpt2.py --method sera --init_from scratch --n_layer 2 --n_head 4 --n_embd 256 \\
        --max_iters 20 --eval_samples 5 --beam 2   # CPU smoke run
    torchrun --standalone --nproc_per_node=4 train_gpt2.py --method lora      # 4 GPUs, DDP
    python train_gpt2.py --method lora --data_dir LoRA/examples/NLG/data/e2e    # LoRA's own E2E files
    python train_gpt2.py --sample "name[The Eagle], food[French]" --out_dir out-e2e   # use the adapter
    python train_gpt2.py --lm_text input.txt --method full --init_from scratch \\
        --n_layer 4 --n_head 4 --n_embd 128 --block_size 128 --label_smoothing 0 --out_dir out-lm  # pretrain
    python train_gpt2.py --method lora --init_from out-lm/adapter.safetensors   # then E2E
    python train_gpt2.py --method lora --export peft out-peft   # also for PEFT + transformers' GPT2LMHeadModel

The loop a reader forks; the model is in model_gpt2.py, the task (data, BPE, metrics) in e2e.py, what this
script shares with train_vit.py (fetching, methods, checkpoints, resume, DDP) in common.py.

Recipe (the LoRA paper's GPT-2 E2E setup, which VB-LoRA's Table 8 and SiVA §4.3 follow): AdamW (eps 1e-6,
as LoRA's optimizer.py), weight decay 0.01, batch 8, 5 epochs, 500 linear warm-up steps then linear decay to
0, label smoothing 0.1, examples up to 512 tokens, loss on the reference and its final EOS only. The data is
E2E in LoRA's form, token for token (e2e.lora_line; docs/e2e-data.md): "name : The Vaults | Type : pub" ->
"The Vaults pub near ... ." Training runs in bf16 autocast on CUDA; decoding in fp32. Decoding as in the
LoRA code's E2E command: beam 10, length penalty 0.8, no-repeat-ngram 4, at most 64 new tokens; outputs
scored against LoRA's tokenized references grouped by MR. Per-method defaults
are listed by `--help`; where a paper gives no GPT-2 E2E value the choice is ours. Where they are silent:
- `--max_iters` caps the run and the decay ends there; warm-up lasts min(--warmup_iters, the run's steps).
- Dev loss is plain cross-entropy (no smoothing) on the first --eval_iters of a fixed shuffle of dev.
- Scratch models come from --seed (checkpoints hold only trainable tensors); --dropout defaults to 0.
- Adapters are never merged: lm_head shares its weight with wte, so a merge there would rewrite both.
- --lm_text FILE[,FILE]: plain language modelling (to pretrain a small base): blocks of min(--max_len,
  block_size) tokens, loss on every next token, every 20th block for dev, no decoding; the literal
  `<|endoftext|>` in a file is EOS, GPT-2's mark between documents.

Multi-GPU: process r of N takes micro-batches r, r+N, ... of one global order, so N processes with
--grad_accum G see exactly what one sees with --grad_accum N*G. Only process 0 logs, evaluates, saves, decodes.

--out_dir: ckpt.pt (to resume) and adapter.safetensors (to use: the method's state dict, VB-LoRA's top-k
form, full: the trained tensors; its header holds the flags and model config that rebuild the model, as
load_finetuned() does); predictions.txt and references.txt (LoRA's form, for e2e-metrics' measure_scores.py
as they are), metrics.json. --export peft|lora DIR writes the adapter for Hugging Face's GPT2LMHeadModel
(q, k, v fused in its Conv1D c_attn); --init_from and --adapter take a PEFT folder (its base_model_name_or_path
is the base).
"""
import argparse
import functools
import math
import os
import re
import time
from collections import defaultdict
from dataclasses import asdict

import torch
import torch.distributed as dist

from common import (HelpFormatter, Missing, Online, adapter_bytes, add_method_args, adapter_state_dict,
                    attach_method, autocast, checkpoint, end_ddp, fetch_all, fill_method_defaults, grad_sync, hms,
                    load_adapter, load_adapter_state_dict, open_run, param_counts, progress_line, restore, save_atomic,
                    setup_ddp, wrap_ddp)
from interop import PEFT_METHODS, base_of, check_export, export_adapter, init_from, read_folder
from e2e import (collate, e2e_scores, encode_e2e, encode_lm_text, estimate_dev_loss, get_tokenizer, load_e2e,
                 lora_context, make_batches, write_outputs)
from model_gpt2 import GPT, GPT2_HEADS, GPTConfig, beam_search, check_config, gpt2_layout, gpt2_weights, load_gpt2

ALL_LINEAR = "q_proj,k_proj,v_proj,attn.c_proj,c_fc,mlp.c_proj"
METHOD_DEFAULTS = {
    "none": {},  # the base model as is: decode and score only
    "full": dict(lr=5e-5),  # our choice: a usual full fine-tuning lr for GPT-2
    "lora": dict(targets="q_proj,v_proj", lora_r=4, lora_alpha=32.0, lora_dropout=0.1, lr=2e-4),  # LoRA, GPT-2 M E2E
    # SeRA has no E2E runs: its default split = r (--sera_split unset), r=8, with LoRA's E2E alpha, targets and lr
    "sera": dict(targets="q_proj,v_proj", sera_r=8, sera_alpha=32.0, sera_dropout=0.0, lr=2e-4),
    # our assumptions: q, v and perc 0.95 are not in the SiVA paper's text for GPT-2 E2E (its Table 8 is
    # missing from our copy), nor is an E2E lr: our 2e-3
    "siva": dict(targets="q_proj,v_proj", siva_perc=0.95, lr=2e-3),
    # Bone has no E2E runs: its default b=64 Bone-col on q, v (LoRA's E2E targets), LoRA's lr
    "bone": dict(targets="q_proj,v_proj", bone_b=64, bone_grouping="col", lr=2e-4),
    "vblora": dict(targets=ALL_LINEAR, vblora_r=4, vblora_b=256, vblora_h=256, vblora_k=2, vblora_bank_lr=1e-3,
                   vblora_logits_lr=1e-2),  # VB-LoRA Table 8
}
ADAPTER_KEYS = ("args", "adapter", "config")

# -----------------------------------------------------------------------------
# Flags


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--init_from", default="gpt2-medium", help=f"{' | '.join(GPT2_HEADS)} (from the Hub), scratch, a local "
      "checkpoint file (.safetensors, .bin/.pt) or folder, or a PEFT adapter folder (its base, then its adapter)")
    a("--n_layer", type=int, default=12, help="scratch model only")
    a("--n_head", type=int, default=12, help="scratch model only")
    a("--n_embd", type=int, default=768, help="scratch model only")
    a("--block_size", type=int, default=1024, help="scratch model only")
    a("--dropout", type=float, default=0.0, help="model dropout (attention, residual, embedding)")
    a("--compile", action="store_true", help="torch.compile the training forward")
    a("--data_dir", default=None, help="folder with LoRA's E2E train.txt, valid.txt, test.txt (context||completion "
      "lines, read as they are) or the official E2E CSVs (converted by e2e.lora_line); default: the Hub's E2E")
    a("--bpe_dir", default=None, help="folder with vocab.bpe + encoder.json (no download); default: tiktoken's "
      "cache or download")
    a("--max_len", type=int, default=512, help="longest training example, in tokens (--lm_text: the block length)")
    a("--lm_text", default=None, help="FILE[,FILE]: plain language modelling on these UTF-8 text files instead of "
      "E2E (blocks of --max_len tokens, loss on every token, every 20th block for dev, no decoding); the literal "
      "<|endoftext|> in a file is EOS, between documents")
    add_method_args(p, METHOD_DEFAULTS, default_method="vblora")
    a("--weight_decay", type=float, default=0.01, help="AdamW weight decay (none on VB-LoRA's bank and logits)")
    a("--warmup_iters", type=int, default=500, help="linear warm-up steps, cut to the run's steps when longer")
    a("--epochs", type=int, default=5, help="passes over the training set")
    a("--max_iters", type=int, default=None, help="cap on optimizer steps; the lr decay ends there (default: none)")
    a("--batch_size", type=int, default=8, help="examples per micro-batch")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step on each process (under "
      "torchrun, N processes with G see what one process sees with N*G)")
    a("--grad_clip", type=float, default=0.0, help="max gradient norm, 0 = off as in the LoRA code's E2E run")
    a("--label_smoothing", type=float, default=0.1, help="on the training loss")
    a("--seed", type=int, default=1, help="scratch weights, adapter init, data order, dropout (+ process rank)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    a("--log_interval", type=int, default=100, help="steps between log lines")
    a("--eval_interval", type=int, default=2000, help="steps between dev-loss estimates and checkpoints")
    a("--eval_iters", type=int, default=100, help="dev batches per dev-loss estimate")
    a("--out_dir", default="out-e2e", help="adapter.safetensors, ckpt.pt, predictions, references, metrics.json")
    a("--resume", action="store_true", help="continue the run in --out_dir/ckpt.pt; only --max_iters, --epochs, "
      "logging, eval and decoding flags may differ from that run's")
    a("--overwrite", action="store_true", help="start over in an --out_dir that holds a run")
    a("--beam", type=int, default=10, help="beam size")
    a("--length_penalty", type=float, default=0.8, help="hypothesis score = log p / length**this")
    a("--no_repeat_ngram", type=int, default=4, help="never repeat a generated n-gram of this size, 0 = off")
    a("--max_new_tokens", type=int, default=64, help="longest output")
    a("--decode_batch", type=int, default=16, help="test MRs decoded together (times beam rows)")
    a("--eval_samples", type=int, default=None, help="decode only the first N test MRs, 0 = none (default: all)")
    a("--sample", default=None, help='decode this one MR, e.g. "name[The Eagle], food[French]" (a | between '
      "fields reads as a comma; without brackets: LoRA's form as typed), with --adapter or --out_dir's adapter; "
      "no training")
    a("--adapter", default=None, help="for --sample: a run's adapter.safetensors or a PEFT folder "
      "(default: --out_dir/adapter.safetensors)")
    args = p.parse_args(argv)
    check_args(args)
    return fill_method_defaults(args, METHOD_DEFAULTS)


AT_LEAST_1 = ("n_layer", "n_head", "n_embd", "max_len", "epochs", "batch_size", "grad_accum", "log_interval",
              "eval_interval", "beam", "max_new_tokens", "decode_batch")
AT_LEAST_0 = ("dropout", "weight_decay", "warmup_iters", "max_iters", "grad_clip", "label_smoothing", "eval_iters",
              "no_repeat_ngram", "eval_samples")


def check_args(args):
    """Bad flags fail here, before anything is loaded, one line each."""
    for k in AT_LEAST_1 + AT_LEAST_0:
        v, low = getattr(args, k), 1 if k in AT_LEAST_1 else 0
        if v is not None and v < low:
            raise SystemExit(f"error: --{k} {v}: must be >= {low}")
    if args.init_from == "scratch":
        if args.n_embd % args.n_head:
            raise SystemExit(f"error: --n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
        if args.block_size < 2:
            raise SystemExit(f"error: --block_size {args.block_size}: must be >= 2")
    if args.sample is not None and not re.sub(r"[\s|,]", "", args.sample):  # nothing but blanks and separators
        raise SystemExit(f'error: --sample {args.sample!r} is an empty MR; give one such as '
                         f'"name[The Eagle] | food[French]"')
    for path in args.lm_text.split(",") if args.lm_text is not None else []:
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise SystemExit(f"error: --lm_text {args.lm_text}: {path!r} is not a non-empty file")
    if args.resume and args.method == "none":
        raise SystemExit("error: --resume: --method none trains nothing, so there is no run to resume; drop "
                         "--resume to evaluate the base model")


# -----------------------------------------------------------------------------
# Model, parameter groups, schedule


def build_model(args, vocab_size, weights=None, config=None):
    """The base model of a run: a random GPT from --seed (scratch; `config` when known) or GPT-2's weights
    from the local file `weights`. Seeds first, so a scratch base is the same model on every rebuild."""
    torch.manual_seed(args.seed)
    if args.init_from != "scratch":
        return load_gpt2(weights or args.init_from, args.dropout)
    config = config or dict(block_size=args.block_size, vocab_size=vocab_size, n_layer=args.n_layer,
                            n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    return GPT(GPTConfig(**config))


def param_groups(model, args):
    """AdamW parameter groups of what trains, each with its base_lr."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if args.method == "vblora":
        # bank and logits on their own lrs (Table 8); no weight decay on them, as in the authors' public NLU and
        # instruction-tuning code (Table 8 itself lists weight decay 0.01)
        groups = [dict(params=[p for n, p in params if "vblora_bank" in n], lr=args.vblora_bank_lr, weight_decay=0.0),
                  dict(params=[p for n, p in params if "vblora_bank" not in n], lr=args.vblora_logits_lr,
                       weight_decay=0.0)]
    elif args.method == "full":  # as nanoGPT: no decay on biases and LayerNorm gains
        groups = [dict(params=[p for _, p in params if p.dim() >= 2], lr=args.lr, weight_decay=args.weight_decay),
                  dict(params=[p for _, p in params if p.dim() < 2], lr=args.lr, weight_decay=0.0)]
    else:
        groups = [dict(params=[p for _, p in params], lr=args.lr, weight_decay=args.weight_decay)]
    return [dict(g, base_lr=g["lr"]) for g in groups if g["params"]]


def lr_factor(step, warmup, total):
    """Linear warm-up to 1 over min(warmup, total) steps, then linear decay to 0 at `total`."""
    warmup = min(warmup, total)  # a run shorter than the warm-up still reaches the full lr
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def hub_name(init_from, base):
    """The base model's name as a PEFT folder records it: the Hub's id, or the local path (None: scratch)."""
    return "openai-community/" + init_from if init_from in GPT2_HEADS else base


def load_finetuned(path, device="cpu"):
    """The fine-tuned model of a run's adapter.safetensors (or its folder), or of a PEFT folder,
    ready to decode: the base model rebuilt from the run's flags (--init_from, or --seed and the saved config for
    scratch; a PEFT folder: its base_model_name_or_path), the method applied, the adapter loaded. A fault in the
    file is one line naming it."""
    peft = read_folder(path, "--adapter")
    if peft is not None:  # a PEFT folder is the adapter and names its base
        args = get_args(["--init_from", path, "--method", PEFT_METHODS[peft["fields"]["peft_type"]]])
        blob = dict(args=vars(args), config={"vocab_size": None}, adapter=None, peft=peft)
    else:
        path = os.path.join(path, "adapter.safetensors") if os.path.isdir(path) else path
        blob = load_adapter(path, ADAPTER_KEYS, METHOD_DEFAULTS)
    args = argparse.Namespace(**blob["args"])
    weights = None
    if args.init_from != "scratch":
        try:
            weights = gpt2_weights(base_of(args.init_from, blob["peft"]), Online())
        except Missing as e:
            raise SystemExit(f"error: {path} was trained on {e.code}")
    else:
        check_config(path, blob["config"], args)
    model = build_model(args, blob["config"]["vocab_size"], weights, blob["config"])
    attach_method(model, args, gpt2_layout, blob["peft"])
    if blob["adapter"] is not None:
        load_adapter_state_dict(model, args.method, blob["adapter"], path)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# Decoding


def check_fits(block_size, prompt_len, args, what):
    if prompt_len + args.max_new_tokens > block_size:
        flag = "--block_size" if args.init_from == "scratch" else "the model's block_size"
        raise SystemExit(f"error: {flag} {block_size} is too short: {what} takes {prompt_len} tokens, "
                         f"+ --max_new_tokens {args.max_new_tokens} = {prompt_len + args.max_new_tokens}")


def decode(model, prompts, eos, args, log=print):
    """Beam search over all prompts in batches of similar length, with a progress line and ETA. In fp32, as
    LoRA decodes: bf16 logits are coarse for ranking ten beams."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths, little left-padding
    outs = [None] * len(prompts)
    n_batches = math.ceil(len(order) / args.decode_batch)
    t0 = time.time()
    for b in range(n_batches):
        ids = order[b * args.decode_batch:(b + 1) * args.decode_batch]
        got = beam_search(model, [prompts[i] for i in ids], eos, args.beam, args.max_new_tokens,
                          args.length_penalty, args.no_repeat_ngram)
        for i, out in zip(ids, got):
            outs[i] = out
        done, el = min((b + 1) * args.decode_batch, len(order)), time.time() - t0
        if b % max(1, n_batches // 10) == 0 or done == len(order):
            log(f"decode {done}/{len(order)} MRs | elapsed {hms(el)} | eta {hms(el / done * (len(order) - done))}")
    return outs


def sample(args, device):
    """--sample: decode one MR with a saved adapter and print the text."""
    path = args.adapter or os.path.join(args.out_dir, "adapter.safetensors")
    if not os.path.exists(path):
        raise SystemExit(f"error: --sample needs an adapter: no {path} (pass --adapter PATH, a run's "
                         f"adapter.safetensors or a PEFT folder, or --out_dir DIR)")
    enc = fetch_all({"bpe": lambda online: get_tokenizer(args.bpe_dir, online)})["bpe"]
    model = load_finetuned(path, device)
    context = lora_context(args.sample) if "[" in args.sample else " ".join(args.sample.split())
    prompt = enc.encode_ordinary(context) + [enc.eot_token]
    check_fits(model.config.block_size, len(prompt), args, "the MR")
    out = beam_search(model, [prompt], enc.eot_token, args.beam, args.max_new_tokens, args.length_penalty,
                      args.no_repeat_ngram)[0]
    text = " ".join(enc.decode(out).split())
    print(text)
    return dict(model=model, sample=text)


def load_data(args, base, log):
    """(tokenizer, train, dev, test contexts -> references, GPT-2 weights path or None: `base`'s), every
    download tried before any missing one is reported. E2E in LoRA's form: (context, completion) rows."""
    t0 = time.time()
    jobs = dict(bpe=lambda online: get_tokenizer(args.bpe_dir, online),
                weights=lambda online: None if args.init_from == "scratch" else
                gpt2_weights(base, online))
    if not args.lm_text:
        jobs["e2e"] = lambda online: load_e2e(args.data_dir, online)
    got = fetch_all(jobs)
    enc, weights = got["bpe"], got["weights"]
    block_size = args.block_size if args.init_from == "scratch" else None  # a checkpoint's: known once loaded
    if block_size is None and args.lm_text:  # the blocks must fit the checkpoint's positions
        block_size = load_gpt2(weights).config.block_size
    max_len = min(args.max_len, block_size or args.max_len)
    if args.lm_text:
        (train, dev), rows = encode_lm_text(args.lm_text.split(","), enc, max_len), []
        log(f"LM text: {len(train)} train, {len(dev)} dev blocks of {max_len} tokens (tokenised in "
            f"{time.time() - t0:.1f}s)")
    else:
        train, dev, rows = encode_e2e(got["e2e"]["train"], enc, max_len), encode_e2e(got["e2e"]["dev"], enc,
                                                                                     max_len), got["e2e"]["test"]
    if not train:
        cap = f"--max_len {args.max_len}" + (f", --block_size {block_size}" if block_size else "")
        raise SystemExit(f"error: no training example fits in {max_len} tokens ({cap}): every MR takes as many")
    test_refs = defaultdict(list)  # context -> its references, in file order, as gpt2_decode.py groups them
    for context, ref in rows:
        test_refs[context].append(ref)
    if not args.lm_text:
        log(f"E2E: {len(train)} train, {len(dev)} dev examples, {len(test_refs)} test MRs "
            f"(tokenised in {time.time() - t0:.1f}s)")
    return enc, train, dev, test_refs, weights


def score(model, enc, mrs, test_refs, step, args, log):
    """Decode these test MRs (LoRA's contexts), score them against their references (LoRA's tokenized
    completions), write predictions, references, metrics."""
    prompts = [enc.encode_ordinary(mr) + [enc.eot_token] for mr in mrs]
    t0 = time.time()
    preds = [" ".join(enc.decode(t).split()) for t in decode(model, prompts, enc.eot_token, args, log)]
    log(f"decoded {len(mrs)} test MRs in {time.time() - t0:.1f}s (beam {args.beam})")
    refs = [test_refs[mr] for mr in mrs]
    scores = e2e_scores(preds, refs)
    log(f"test ({len(mrs)} MRs): BLEU {100 * scores['BLEU']:.2f} | NIST {scores['NIST']:.4f} | "
        f"METEOR(exact) {100 * scores['METEOR']:.2f} | ROUGE-L {100 * scores['ROUGE_L']:.2f} | "
        f"CIDEr {scores['CIDEr']:.4f}")
    write_outputs(args.out_dir, preds, refs, dict(scores, method=args.method, step=step, n_mrs=len(mrs)))
    return preds, scores


# -----------------------------------------------------------------------------
# The script


def main(argv=None):
    """The script. -> {model, step, predictions, scores, n_trainable, n_stored, train_loss (the last logged, as
    trained), dev_loss, curve [(step, loss)], dev_curve [(step, dev loss)], train_time (s, no eval), tokens_per_s}."""
    # ---- setup: flags, processes, the out_dir guard
    args = get_args(argv)
    ddp, rank, world_size, device = setup_ddp(args.device)
    master = rank == 0  # logs, evaluates, saves and decodes
    log = print if master else lambda *a, **k: None
    ctx = autocast(device)
    if args.sample is not None:
        return sample(args, device)
    ckpt_path, adapter_path = (os.path.join(args.out_dir, f) for f in ("ckpt.pt", "adapter.safetensors"))
    peft, base = init_from(args)  # a PEFT folder as --init_from, read once; the base weights' path
    ckpt = open_run(args, world_size)

    # ---- data
    enc, train, dev, test_refs, weights = load_data(args, base, log)
    eos = enc.eot_token

    # ---- model and method: seeded, so every rank builds the same base and adapter
    mrs = list(test_refs)[:args.eval_samples]  # the test MRs to decode
    model = build_model(args, enc.n_vocab, weights)
    if mrs:  # before training: the longest MR to decode and its output must fit the positions
        longest = max(len(enc.encode_ordinary(mr)) + 1 for mr in mrs)
        check_fits(model.config.block_size, longest, args, "the longest test MR")
    attach_method(model.to(device), args, gpt2_layout, peft)  # a PEFT folder's adapter: stored with the run's
    check_export(args, model, gpt2_layout)  # before training: an adapter PEFT cannot hold is refused now
    groups = param_groups(model, args)
    n_train, n_stored, n_base = param_counts(model, args.method)
    log(f"method {args.method}: {n_train:,} trainable params, {n_stored:,} stored (base model {n_base:,})")
    torch.manual_seed(args.seed + rank)  # dropout differs per rank (nanoGPT's seed offset)
    train_model = torch.compile(model, dynamic=True) if args.compile else model
    if ddp and groups:
        train_model = wrap_ddp(train_model, device)

    # ---- optimizer and schedule
    n_batches = math.ceil(len(train) / args.batch_size)  # micro-batches per epoch, over all ranks
    total = args.epochs * math.ceil(n_batches / (args.grad_accum * world_size)) if groups else 0
    total = total if args.max_iters is None else min(total, args.max_iters)
    opt = torch.optim.AdamW(groups, eps=1e-6, fused=device.type == "cuda") if groups else None  # LoRA's eps

    # ---- resume
    step = restore(ckpt, ckpt_path, model, opt, master, device, log) if ckpt is not None else 0
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
    if ddp:
        dist.barrier()  # every rank has passed the checks above before rank 0 writes anything
    dev_batches = make_batches([len(t) for t, _ in dev], args.batch_size, torch.Generator().manual_seed(0))
    dev_loss = lambda: estimate_dev_loss(model, dev, dev_batches[:args.eval_iters], eos, device, ctx)

    # ---- the training loop
    train_lengths, params = [len(t) for t, _ in train], [p for g in groups for p in g["params"]]
    epoch_batches = functools.lru_cache(maxsize=1)(  # epoch e's fixed shuffle, built when first needed
        lambda e: make_batches(train_lengths, args.batch_size, torch.Generator().manual_seed(args.seed + e)))
    model.train()
    t_start = t_log = time.time()
    loss_sum, tokens, n_logged, start_step = torch.zeros((), device=device), 0, 0, step  # since the last log line
    curve, dev_curve, train_loss, last_dev, tokens_seen, train_time = [], [], None, None, 0, 0.0  # the summary
    while step < total:
        for g in opt.param_groups:  # the schedule
            g["lr"] = g["base_lr"] * lr_factor(step, args.warmup_iters, total)
        for micro in range(args.grad_accum):  # forward and backward over the step's micro-batches
            # global micro-batch m is batch i of epoch e's fixed shuffle: a resume sees the same data, and
            # rank r takes every world_size-th one, so N ranks see what one rank sees with N x --grad_accum
            m = (step * args.grad_accum + micro) * world_size + rank
            epoch, i = divmod(m, n_batches)
            batch = [train[j] for j in epoch_batches(epoch)[i]]
            x, y = collate(batch, eos)
            with ctx, grad_sync(train_model, ddp, last=micro == args.grad_accum - 1):
                _, loss = train_model(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                      label_smoothing=args.label_smoothing)
                (loss / args.grad_accum).backward()  # DDP then averages over ranks
            loss_sum += loss.detach().float() / args.grad_accum
            tokens += sum(len(t) - 1 for t, _ in batch)
        if args.grad_clip > 0:  # the update
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        n_logged += 1
        if step % args.log_interval == 0 or step == total:  # the log line: every rank's loss and tokens
            seen = torch.stack([loss_sum, torch.tensor(float(tokens), device=device)])
            if ddp:
                dist.all_reduce(seen)
            now = time.time()
            train_loss = seen[0].item() / n_logged / world_size
            curve.append((step, train_loss))
            tokens_seen, train_time = tokens_seen + seen[1].item(), train_time + now - t_log
            log(progress_line(step, total, train_loss, opt.param_groups[0]["lr"], seen[1].item() / (now - t_log),
                              "tok/s", t_start, start_step, now))
            loss_sum.zero_()
            tokens, n_logged, t_log = 0, 0, now
        if master and (step % args.eval_interval == 0 or step == total):  # dev loss and a checkpoint
            last_dev = dev_loss()
            dev_curve.append((step, last_dev))
            log(f"step {step}: dev loss {last_dev:.4f}")
            save_atomic(checkpoint(args, step, world_size, model, opt, device), ckpt_path)
            t_log = time.time()  # tok/s counts training only
    end_ddp(ddp)
    result = dict(model=model, step=step, predictions=[], scores={}, n_trainable=n_train, n_stored=n_stored,
                  train_loss=train_loss, dev_loss=last_dev, curve=curve, dev_curve=dev_curve, train_time=train_time,
                  tokens_per_s=tokens_seen / train_time if train_time else None)
    if not master:
        return result

    # ---- save, decode and score
    if total == 0 and dev:
        result["dev_loss"] = dev_loss()
        log(f"dev loss {result['dev_loss']:.4f}")
    save_atomic(adapter_bytes(dict(args=vars(args), config=asdict(model.config)),
                              adapter_state_dict(model, args.method), peft), adapter_path)
    log(f"saved {adapter_path}")
    if args.export:  # for Hugging Face's GPT2LMHeadModel: its fused c_attn, its Conv1D layout
        export_adapter(args, model, gpt2_layout, hub_name(args.init_from, base), log=log)
    model.eval()
    if mrs:
        result["predictions"], result["scores"] = score(model, enc, mrs, test_refs, step, args, log)
    return result

if __name__ == "__main__":
    main()
