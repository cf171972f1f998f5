"""Fine-tune GPT-2 on the E2E NLG Challenge with any nanopeft method, decode with beam search, score.

    python train_gpt2.py --method vblora                  # GPT-2 Medium, E2E from the Hub, paper recipe
    python train_gpt2.py --method lora --data_dir e2e-dataset --bpe_dir gpt2-bpe   # offline: local files
    python train_gpt2.py --method sera --init_from scratch --n_layer 2 --n_head 4 --n_embd 256 \\
        --max_iters 20 --eval_samples 5 --beam 2   # CPU smoke run
    torchrun --standalone --nproc_per_node=4 train_gpt2.py --method lora      # 4 GPUs, DDP
    python train_gpt2.py --sample "name[The Eagle], food[French]" --out_dir out-e2e   # use the adapter
    python train_gpt2.py --lm_text input.txt --method full --init_from scratch \
        --n_layer 4 --n_head 4 --n_embd 128 --block_size 128 --label_smoothing 0 --out_dir out-lm  # pretrain
    python train_gpt2.py --method lora --init_from out-lm/adapter.pt   # then E2E

One flat file: a compact GPT-2 (Hugging Face module names, so checkpoints load key for key, except that
q, k, v are three nn.Linears `attn.q_proj/k_proj/v_proj`, split from HF's fused `c_attn`, so methods
target them the way the papers count them), the E2E data, the training loop, beam search, and the
E2E metrics in plain Python.

Recipe (the LoRA paper's GPT-2 E2E setup, which VB-LoRA's Table 8 and SiVA §4.3 follow): AdamW, weight
decay 0.01, batch 8, 5 epochs, 500 linear warm-up steps then linear decay to 0, label smoothing 0.1,
examples up to 512 tokens; example = tokens(mr) + EOS + tokens(' ' + ref) + EOS, loss on the reference
and its final EOS only. Decoding as in the LoRA code's E2E command: beam 10, length penalty 0.8,
no-repeat-ngram 4, at most 64 new tokens. Per-method defaults (targets, shapes, lr) are listed by
`--help`; where a paper gives no GPT-2 E2E value the choice is ours and says so there.

Choices where the papers are silent:
- `--max_iters` caps the run and the linear decay ends there; warm-up lr is (step+1)/warmup * lr, with
  warmup = min(--warmup_iters, the run's steps), so a run shorter than the warm-up still reaches --lr
  (at its last step, without decay).
- Batches are bucketed (shuffle, sort by length within windows of 50 batches, shuffle the batches) and
  right-padded to the longest example; causal attention never lets a real token see a later pad.
- Dev loss is plain cross-entropy (no smoothing) on the first --eval_iters of a fixed shuffle of dev.
- Scratch models come from --seed (checkpoints hold only trainable tensors); --dropout defaults to 0
  (the LoRA code's GPT-2 has no dropout besides the adapter's).
- Adapters are never merged: lm_head shares its weight with wte, so merging an adapter on lm_head would
  rewrite the embedding too.
- --lm_text FILE[,FILE]: plain language modelling instead of E2E (to pretrain a small base): the files,
  each encoded whole and joined by EOS, are cut into consecutive blocks of min(--max_len, block_size)
  tokens; the loss is on every next token of a block; every 20th block is held out as the dev set
  (so dev samples every file); nothing is decoded. A full run's adapter.pt is then an --init_from.

Multi-GPU (nanoGPT's pattern): under torchrun every process trains a DistributedDataParallel copy. One
optimizer step takes --grad_accum micro-batches of --batch_size on each of the N processes; process r
takes micro-batches r, r+N, r+2N, ... of the same global order, so N processes with --grad_accum G see
exactly what one process sees with --grad_accum N*G, and their loss and gradient are its average. Only
process 0 logs, evaluates, saves and decodes.

--out_dir: ckpt.pt (to resume: the run's arguments, step, trainable tensors, optimizer, RNG) and
adapter.pt (to use: {"args", "method", "adapter", "config"}: the arguments and model config rebuild the
model; the adapter is the method's state dict, VB-LoRA's compact top-k form, full/none: the trainable
tensors; load_finetuned() does it in one call). A run refuses an --out_dir that already holds them
unless --resume (continue; every flag that alters the run must be unchanged) or --overwrite.

Metrics (on the test set, references grouped per MR; printed in the papers' units: BLEU, METEOR,
ROUGE-L x100). What the official e2e-metrics scripts do and how this file differs:
- BLEU-4 and NIST-5: mteval-v13a.pl as e2e-metrics calls it: its tokeniser (punctuation split off,
  ASCII lowercased, no -c), corpus-level clipped counts, closest reference length (ties: shorter),
  its smoothing of zero n-gram matches, NIST information weights from all test references. NIST's length
  penalty divides the total reference words by the *largest* number of references of any MR (e2e-metrics
  pads every MR to that many references), as the Perl script does. Meant to match to rounding.
- METEOR, ROUGE-L, CIDEr-D come from coco-caption in e2e-metrics, which first runs the Stanford PTB
  tokenizer (lowercase, clitics split, punctuation dropped); here a regex approximation of it, so these
  three may differ slightly from the official numbers.
- METEOR: only exact matching is feasible in plain Python (no Meteor stems, WordNet synonyms,
  paraphrase table, or function-word weighting). Meteor 1.5 English parameters (alpha .85, beta .2,
  gamma .6), greedy chunk-minimising alignment, best reference per MR, corpus score from summed
  statistics. Reads a few points lower than official METEOR, which also credits stems and synonyms.
- ROUGE-L: per MR, F_beta (beta 1.2) of the max precision and the max recall over its references, taken
  separately (coco's rule); averaged over MRs.
- CIDEr-D: 1-4-grams, tf-idf with document frequencies over the test MRs' reference sets, clipped
  products, Gaussian length penalty (sigma 6) on the bigram counts (coco's quirk), x10, averaged.
predictions.txt (one per MR) and references.txt (blank-line separated) in --out_dir are the
e2e-metrics input format, for scoring with the official scripts.
"""
import argparse
import csv
import inspect
import io
import json
import math
import os
import re
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass

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
from resources import Missing, Online, fetch_all

IGNORE = -100  # target id the loss skips (MR tokens, padding)

# -----------------------------------------------------------------------------
# Model: GPT-2 with Hugging Face's module names, q/k/v as separate nn.Linears


@dataclass
class GPTConfig:
    block_size: int = 1024  # positions in wpe; every GPT-2 checkpoint has 1024
    vocab_size: int = 50257  # GPT-2 BPE: 50000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 24  # GPT-2 Medium, the papers' E2E model
    n_head: int = 16
    n_embd: int = 1024
    dropout: float = 0.0  # fine-tuning runs without it; the adapters bring their own
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        C = config.n_embd
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, mask=None, cache=None):
        """mask: None = plain causal; else bool (B, 1, T, T_keys), True = may attend.
        cache: this layer's [k, v] list (empty at first), extended in place with the new keys/values."""
        B, T, C = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            if cache:
                k = torch.cat([cache[0], k], dim=2)  # (B, nh, T_past + T, hs)
                v = torch.cat([cache[1], v], dim=2)  # (B, nh, T_past + T, hs)
            cache[:] = [k, v]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu_new


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for n, p in self.named_parameters():
            if n.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, pos=None, mask=None, cache=None, label_smoothing=0.0):
        """With targets: (logits at the target positions (N, V), mean loss over them).
        Without: (logits of the last position (B, 1, V), None). pos (T,) or (B, T); default 0..T-1."""
        B, T = idx.size()
        if pos is None:
            pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, None if cache is None else cache[i])
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V): decoding needs the last position only
        keep = targets != IGNORE  # (B, T): only these positions pay for the vocabulary projection
        logits = self.lm_head(x[keep])  # (N, V)
        return logits, F.cross_entropy(logits.float(), targets[keep], label_smoothing=label_smoothing)


# -----------------------------------------------------------------------------
# Checkpoints: Hugging Face GPT-2 layout -> ours

GPT2_HEADS = {"gpt2": 12, "gpt2-medium": 16, "gpt2-large": 20, "gpt2-xl": 25}  # n_head is not in the weights


def convert_hf_state_dict(sd):
    """HF GPT-2 tensors -> ours: the fused Conv1D c_attn (in, 3C) becomes q_proj/k_proj/v_proj weights
    (C, C); every Conv1D weight is transposed to nn.Linear's (out, in); the causal-mask buffers go; lm_head
    is wte. A state dict already in our layout (e.g. a full fine-tune's adapter.pt) passes through."""
    if any(".q_proj." in k for k in sd):
        out = dict(sd)
    else:
        out = {}
        for k, v in sd.items():
            k = k.removeprefix("transformer.")
            if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
                continue
            name = "transformer." + k
            if k.endswith("attn.c_attn.weight"):
                for proj, w in zip(("q_proj", "k_proj", "v_proj"), v.t().chunk(3, dim=0)):  # (3C, C) -> 3 x (C, C)
                    out[name.replace("c_attn", proj)] = w.contiguous()
            elif k.endswith("attn.c_attn.bias"):
                for proj, b in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3)):  # (3C,) -> 3 x (C,)
                    out[name.replace("c_attn", proj)] = b.contiguous()
            elif k.endswith((".c_proj.weight", ".c_fc.weight")):
                out[name] = v.t().contiguous()  # Conv1D (in, out) -> nn.Linear (out, in)
            else:
                out[name] = v
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def load_gpt2(path, dropout=0.0, n_head=None):
    """Our GPT from a local GPT-2 checkpoint: a model.safetensors / pytorch_model.bin (HF layout), the
    folder holding one, or a full fine-tune's adapter.pt. n_head is not in the weights: the argument, else
    a config.json beside the file, else the model config saved in adapter.pt, else n_embd / 64 (every
    GPT-2 size has 64-dim heads)."""
    if os.path.isdir(path):
        names = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, f))]
        if not names:
            raise SystemExit(f"error: --init_from {path}: no model.safetensors or pytorch_model.bin in that folder")
        path = os.path.join(path, names[0])
    if not os.path.isfile(path):
        raise SystemExit(f"error: --init_from {path}: not a GPT-2 size ({', '.join(GPT2_HEADS)}), 'scratch', "
                         f"or an existing file or folder")
    config_json = os.path.join(os.path.dirname(path), "config.json")
    if n_head is None and os.path.isfile(config_json):
        with open(config_json) as f:
            n_head = json.load(f).get("n_head")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if "adapter" in sd and "args" in sd:  # a full fine-tune's adapter.pt: its tensors and its model config
            n_head = n_head or sd.get("config", {}).get("n_head")
            sd = sd["adapter"]
    sd = convert_hf_state_dict(sd)
    V, C = sd["transformer.wte.weight"].shape
    n_layer = len([k for k in sd if k.endswith(".ln_1.weight")])
    config = GPTConfig(block_size=sd["transformer.wpe.weight"].shape[0], vocab_size=V, n_layer=n_layer,
                       n_head=n_head or C // 64, n_embd=C, dropout=dropout)
    model = GPT(config)
    model.load_state_dict(sd)
    return model


# -----------------------------------------------------------------------------
# What may come from the network: GPT-2's weights, the BPE files, E2E. Local files first; the network is
# probed once, and offline one message lists everything missing with the flag that replaces it
# (resources.py, shared with train_vit.py and reproduce.py).

E2E_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
E2E_HUB = "tuetschek/e2e_nlg"  # its loading script no longer runs in datasets>=4; the Hub's parquet export does
GPT2_BPE_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                   "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
FLAG_FOR = {  # what replaces each download
    "weights": "--init_from PATH (a model.safetensors or pytorch_model.bin, or its folder) or --init_from scratch",
    "bpe": "--bpe_dir DIR (holding vocab.bpe and encoder.json, from openaipublic.blob.core.windows.net/gpt-2/"
           "encodings/main/)",
    "e2e": f"--data_dir DIR (holding {', '.join(E2E_FILES.values())}, from github.com/tuetschek/e2e-dataset)",
}


def gpt2_weights(init_from, online):
    """A local file or folder for --init_from: itself, or the Hub checkpoint (cache first, then download)."""
    if init_from not in GPT2_HEADS:
        return init_from
    from huggingface_hub import hf_hub_download
    repo = "openai-community/" + init_from
    try:
        return hf_hub_download(repo, "model.safetensors", local_files_only=True)
    except Exception:
        pass  # not in the cache
    if not online():
        raise Missing(f"GPT-2 weights {repo}/model.safetensors (not in the Hugging Face cache): pass "
                      f"{FLAG_FOR['weights']}")
    try:
        return hf_hub_download(repo, "model.safetensors")
    except Exception as e:
        raise Missing(f"GPT-2 weights {repo}/model.safetensors ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                      f"pass {FLAG_FOR['weights']}")


def get_tokenizer(bpe_dir=None, online=lambda: True):
    """tiktoken's GPT-2 encoding from OpenAI's vocab.bpe + encoder.json (checked by hash): in bpe_dir when
    given, else tiktoken's download or cache."""
    import tiktoken
    if not bpe_dir:
        if not online():
            raise Missing(f"GPT-2 BPE files vocab.bpe, encoder.json (tiktoken's download): pass {FLAG_FOR['bpe']}")
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches its files from openaipublic.blob.core.windows.net
            raise Missing(f"GPT-2 BPE files vocab.bpe, encoder.json ({type(e).__name__}: {e}): pass {FLAG_FOR['bpe']}")
    files = {f: os.path.join(bpe_dir, f) for f in GPT2_BPE_SHA256}
    if not all(os.path.isfile(p) for p in files.values()):
        raise SystemExit(f"error: --bpe_dir {bpe_dir}: needs both vocab.bpe and encoder.json")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(files["vocab.bpe"], files["encoder.json"],
                                                GPT2_BPE_SHA256["vocab.bpe"], GPT2_BPE_SHA256["encoder.json"])
    except ValueError as e:  # a hash mismatch: not OpenAI's GPT-2 files
        raise SystemExit(f"error: --bpe_dir {bpe_dir}: {e}")
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def load_e2e(data_dir=None, online=lambda: True):
    """{"train", "dev", "test"} -> [(mr, ref)], from the official CSVs in data_dir or from the Hub."""
    if data_dir:
        paths = {s: os.path.join(data_dir, f) for s, f in E2E_FILES.items()}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise SystemExit(f"error: --data_dir {data_dir}: missing {', '.join(missing)}")
        return {s: read_e2e_csv(p) for s, p in paths.items()}
    if not online():
        raise Missing(f"E2E dataset {E2E_HUB} (the Hugging Face Hub): pass {FLAG_FOR['e2e']}")
    try:
        import datasets
        ds = datasets.load_dataset(E2E_HUB, revision="refs/convert/parquet", data_files={
            "train": "default/train/*.parquet", "dev": "default/validation/*.parquet",
            "test": "default/test/*.parquet"})
    except Exception as e:  # the Hub unreachable, or datasets missing
        raise Missing(f"E2E dataset {E2E_HUB} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): pass "
                      f"{FLAG_FOR['e2e']}")
    data = {s: list(zip(d["meaning_representation"], d["human_reference"])) for s, d in ds.items()}
    for s, rows in data.items():
        if not rows or not all(mr.strip() and ref.strip() for mr, ref in rows):
            raise SystemExit(f"error: the Hub's {E2E_HUB} {s} split is empty or has an empty field")
    return data


def fetch_resources(args, what=("bpe", "e2e", "weights")):
    """(tokenizer, E2E data, GPT-2 weights path or None for scratch), all fetched before anything else
    runs (None for what is not asked for). Whatever cannot be had is reported at once, each with the flag
    that replaces it."""
    jobs = dict(bpe=lambda online: get_tokenizer(args.bpe_dir, online),
                e2e=lambda online: load_e2e(args.data_dir, online),
                weights=lambda online: None if args.init_from == "scratch" else gpt2_weights(args.init_from, online))
    got = fetch_all({key: jobs[key] for key in what})
    return got.get("bpe"), got.get("e2e"), got.get("weights")


# -----------------------------------------------------------------------------
# E2E data


def read_e2e_csv(path):
    """[(mr, ref)] from an official E2E CSV (header mr,ref; quoted fields; CRLF). Not UTF-8, no header, no
    rows, or a row without both fields: an error naming the file and line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SystemExit(f"error: {path}, line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        header = next(reader, None)
        if header is None:
            raise SystemExit(f"error: {path} is empty (expected the header mr,ref and rows)")
        if [h.strip().lower() for h in header[:2]] != ["mr", "ref"]:
            raise SystemExit(f"error: {path}, line 1: expected the header mr,ref, found {header}")
        for r in reader:
            if r and (len(r) < 2 or not r[0].strip() or not r[1].strip()):
                raise SystemExit(f"error: {path}, line {reader.line_num}: expected two non-empty fields mr,ref, "
                                 f"found {r}"[:300])
            if r:
                rows.append((r[0], r[1]))
    except csv.Error as e:
        raise SystemExit(f"error: {path}, line {reader.line_num}: {e}")
    if not rows:
        raise SystemExit(f"error: {path} has a header but no rows")
    return rows


def encode_e2e(rows, enc, max_len):
    """[(tokens, n_prompt)]: tokens = tokens(mr) + EOS + tokens(' ' + ref) + EOS, cut at max_len;
    n_prompt = len(tokens(mr)) + 1. Each distinct MR is encoded once."""
    eos = enc.eot_token
    mr_tokens = {mr: enc.encode_ordinary(mr) for mr in {mr for mr, _ in rows}}
    ref_tokens = [enc.encode_ordinary(" " + ref) for _, ref in rows]  # a plain loop beats encode_batch here
    out = []
    for (mr, _), ref in zip(rows, ref_tokens):
        prompt = mr_tokens[mr] + [eos]
        if len(prompt) < max_len:  # at least one reference token to learn from
            out.append(((prompt + ref + [eos])[:max_len], len(prompt)))
    return out


def encode_lm_text(paths, enc, block):
    """(train, dev) lists of (tokens, 1): the files encoded and joined by EOS, cut into consecutive blocks of
    `block` tokens (the tail that fills no block is dropped); n_prompt 1, so the loss is on every next token.
    Every 20th block goes to dev."""
    tokens = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tokens += enc.encode_ordinary(f.read()) + [enc.eot_token]
    blocks = [(tokens[i:i + block], 1) for i in range(0, len(tokens) - block + 1, block)]
    if len(blocks) < 2:
        raise SystemExit(f"error: --lm_text: {len(tokens)} tokens make {len(blocks)} block(s) of {block}; need 2 "
                         f"(one for dev): more text or a smaller --max_len")
    return [b for i, b in enumerate(blocks) if i % 20 != 19], [b for i, b in enumerate(blocks) if i % 20 == 19]


def collate(examples, pad):
    """Right-pad to the longest example: x (B, T) inputs, y (B, T) next tokens, IGNORE outside the reference."""
    T = max(len(t) for t, _ in examples) - 1
    x = torch.full((len(examples), T), pad, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (tokens, n_prompt) in enumerate(examples):
        t = torch.tensor(tokens)
        x[i, :len(t) - 1] = t[:-1]
        y[i, n_prompt - 1:len(t) - 1] = t[n_prompt:]  # predict the reference and its EOS, never the MR
    return x, y


def make_batches(lengths, batch_size, gen):
    """Lists of example indices: shuffle, sort by length within windows of 50 batches (little padding),
    shuffle the batches."""
    order = torch.randperm(len(lengths), generator=gen).tolist()
    w = 50 * batch_size
    order = [i for s in range(0, len(order), w) for i in sorted(order[s:s + w], key=lengths.__getitem__)]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


# -----------------------------------------------------------------------------
# Methods: flag defaults for GPT-2 on E2E, and name -> (Config from args, apply, state dict, load)

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
METHODS = {
    "lora": (lambda a: lora.LoRAConfig(r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout),
             lora.apply_lora, lora.lora_state_dict, lora.load_lora_state_dict),
    "sera": (lambda a: sera.SeRAConfig(r=a.sera_r, split=a.sera_r if a.sera_split is None else a.sera_split,
                                       alpha=a.sera_alpha, dropout=a.sera_dropout),
             sera.apply_sera, sera.sera_state_dict, sera.load_sera_state_dict),
    "siva": (lambda a: siva.SiVAConfig(perc=a.siva_perc),
             siva.apply_siva, siva.siva_state_dict, siva.load_siva_state_dict),
    "bone": (lambda a: bone.BoneConfig(b=a.bone_b, grouping=a.bone_grouping),
             bone.apply_bone, bone.bone_state_dict, bone.load_bone_state_dict),
    "vblora": (lambda a: vblora.VBLoRAConfig(r=a.vblora_r, b=a.vblora_b, h=a.vblora_h, k=a.vblora_k),
               vblora.apply_vblora, lambda m: vblora.vblora_state_dict(m, compact=True),
               vblora.load_vblora_state_dict),
}


def apply_method(model, args):
    """Freeze the model, attach the method, return AdamW parameter groups (each with its base_lr)."""
    model.requires_grad_(args.method == "full")
    if args.method in METHODS:
        config, apply, _, _ = METHODS[args.method]
        try:
            apply(model, config(args), args.targets.split(","))
        except ValueError as e:  # a constraint of the method's config, or a target that matches nothing
            raise SystemExit(f"error: --method {args.method}: {e}")
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
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def adapter_state_dict(model, method):
    """What a user ships: the method's adapter tensors (VB-LoRA compact); full/none: the trainable tensors."""
    if method in METHODS:
        return METHODS[method][2](model)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def stored_param_count(model, method):
    if method == "vblora":
        return vblora.vblora_stored_param_count(model)
    return sum(t.numel() for t in adapter_state_dict(model, method).values())


def lr_factor(step, warmup, total):
    """Linear warm-up to 1 over min(warmup, total) steps, then linear decay to 0 at `total`."""
    warmup = min(warmup, total)  # a run shorter than the warm-up still reaches the full lr
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))

# -----------------------------------------------------------------------------
# Beam search with a KV cache, batched over prompts


def ban_repeats(logp, hist, n):
    """-inf on every token that would repeat an n-gram of hist (fairseq's no_repeat_ngram_size)."""
    win = hist.unfold(1, n, 1)  # (R, t-n+1, n): every n-gram generated so far
    suffix = hist[:, None, hist.size(1) - n + 1:]  # (R, 1, n-1): the last n-1 tokens
    hit = (win[:, :, :-1] == suffix).all(-1)  # (R, t-n+1): n-grams that this suffix would repeat
    r, w = hit.nonzero(as_tuple=True)
    return logp.index_put((r, win[r, w, -1]), torch.tensor(float("-inf"), device=logp.device))


@torch.no_grad()
def beam_search(model, prompts, eos, beam=10, max_new_tokens=64, length_penalty=0.8, no_repeat_ngram=4):
    """Continuations (token lists, EOS cut) of a batch of prompts, all beams of all prompts in one batch.

    The LoRA code's E2E beam search (reused by VB-LoRA and SiVA): each step keeps the `beam` sequences
    with the highest summed log-probability; a sequence that emits EOS leaves the beam as a finished
    hypothesis scored sum / length**length_penalty (length = generated tokens with EOS); after
    max_new_tokens the live beams count as hypotheses too. Prompts are left-padded: pads are masked out
    of attention and positions count from each prompt's first real token.
    """
    dev = next(model.parameters()).device  # never lm_head.weight: a method may have wrapped lm_head
    B, K, L = len(prompts), beam, max(map(len, prompts))
    if L + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt of {L} tokens + {max_new_tokens} new exceeds block_size {model.config.block_size}")
    idx = torch.full((B, L), eos, dtype=torch.long)
    valid = torch.zeros(B, L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, L - len(p):] = torch.tensor(p)
        valid[i, L - len(p):] = True
    idx, valid = idx.to(dev), valid.to(dev)
    pos = (valid.cumsum(1) - 1).clamp(min=0)  # (B, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    mask = causal & valid[:, None, :] | torch.eye(L, dtype=torch.bool, device=dev)  # (B, L, L): a pad sees only itself
    cache = [[] for _ in model.transformer.h]
    logits, _ = model(idx, pos=pos, mask=mask[:, None], cache=cache)  # (B, 1, V)
    rows = torch.arange(B, device=dev).repeat_interleave(K)  # (B*K,): K copies of every prompt
    for c in cache:
        c[:] = [t[rows] for t in c]
    logits, valid, pos = logits[rows], valid[rows], pos[rows, -1:] + 1  # (B*K, 1, V), (B*K, L), (B*K, 1)
    scores = torch.full((B, K), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # one live copy at first, so the first step picks K different tokens
    first = torch.arange(B, device=dev)[:, None] * K  # (B, 1): first row of each prompt
    hist = torch.empty(B * K, 0, dtype=torch.long, device=dev)
    best = [(float("-inf"), [])] * B
    for t in range(max_new_tokens):
        if t:
            valid = torch.cat([valid, valid.new_ones(B * K, 1)], dim=1)  # (B*K, L + t)
            logits, _ = model(tok, pos=pos + t - 1, mask=valid[:, None, None, :], cache=cache)  # (B*K, 1, V)
        logp = F.log_softmax(logits[:, -1].float(), dim=-1)  # (B*K, V)
        if 0 < no_repeat_ngram <= t:
            logp = ban_repeats(logp, hist, no_repeat_ngram)
        V = logp.size(-1)
        scores, flat = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V).topk(K, dim=1)  # (B, K)
        rows = (first + flat // V).view(-1)  # (B*K,): the row each new beam extends
        tok = (flat % V).view(-1, 1)  # (B*K, 1)
        hist = torch.cat([hist[rows], tok], dim=1)  # (B*K, t + 1)
        for c in cache:
            c[:] = [x[rows] for x in c]
        done = (tok.view(B, K) == eos) & scores.isfinite()  # (B, K)
        for b, k in done.nonzero().tolist():
            s = scores[b, k].item() / (t + 1) ** length_penalty
            if s > best[b][0]:
                best[b] = (s, hist[b * K + k, :-1].tolist())
        scores = scores.masked_fill(done, float("-inf"))
        if not scores.isfinite().any():
            break
    for b, k in scores.isfinite().nonzero().tolist():  # beams still alive after max_new_tokens
        s = scores[b, k].item() / hist.size(1) ** length_penalty
        if s > best[b][0]:
            best[b] = (s, hist[b * K + k].tolist())
    return [tokens for _, tokens in best]


# -----------------------------------------------------------------------------
# E2E metrics (see the module docstring for how they relate to the official scripts)

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_MTEVAL_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
# coco-caption drops these PTB tokens; ( ) { } stand for its -LRB- -RRB- -LCB- -RCB-
_PTB_DROP = {"''", "'", "``", "`", "(", ")", "{", "}", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def mteval_tokenize(s):
    """mteval-v13a.pl's default tokeniser, lowercasing ASCII as it does without -c."""
    s = _MTEVAL_PUNCT.sub(r" \1 ", " " + s.translate(_ASCII_LOWER) + " ")
    s = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", s)  # period and comma split unless preceded by a digit
    s = re.sub(r"([\.,])([^0-9])", r" \1 \2", s)  # ... or followed by one
    s = re.sub(r"([0-9])(-)", r"\1 \2 ", s)
    return s.split()


def coco_tokenize(s):
    """Approximates coco-caption's Stanford PTBTokenizer -lowerCase plus its punctuation removal."""
    s = s.lower().replace('"', " '' ")
    s = re.sub(r"(\w)(n't)\b", r"\1 \2", s)
    s = re.sub(r"(\w)('(?:s|re|ve|ll|d|m))\b", r"\1 \2", s)
    s = re.sub(r"(\.\.\.|--|[^\w\s'.,-]|(?<!\d)[.,]|[.,](?!\d)|(?<!\w)-|-(?!\w))", r" \1 ", " " + s + " ")
    return [t for t in s.split() if t not in _PTB_DROP]


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu_nist(hyps, refs):
    """Corpus BLEU-4 and NIST-5 as mteval-v13a.pl computes them for e2e-metrics."""
    H = [mteval_tokenize(h) for h in hyps]
    R = [[mteval_tokenize(r) for r in rs] for rs in refs]
    ref_counts, ref_words = Counter(), 0  # NIST information comes from every reference n-gram of the corpus
    for rs in R:
        for r in rs:
            ref_words += len(r)
            for n in range(1, 6):
                ref_counts.update(_ngrams(r, n))
    match, tst, info = [0] * 5, [0] * 5, [0.0] * 5
    ref_len = 0
    for h, rs in zip(H, R):
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]  # closest length, ties to the shorter
        for n in range(1, 6):
            tst[n - 1] += max(len(h) - n + 1, 0)
            clip = Counter()
            for r in rs:
                clip |= _ngrams(r, n)  # max count over the references
            for g, c in _ngrams(h, n).items():
                m = min(c, clip[g])
                if m:
                    match[n - 1] += m
                    info[n - 1] += m * math.log2((ref_counts[g[:-1]] if n > 1 else ref_words) / ref_counts[g])
    log_p, smooth = 0.0, 1
    for n in range(4):
        if tst[n] and match[n]:
            log_p += math.log(match[n] / tst[n])
        elif tst[n]:  # mteval's smoothing: 1 / 2^k for the k-th precision without a match
            smooth *= 2
            log_p -= math.log(smooth * tst[n])
    bleu = math.exp(min(0.0, 1 - ref_len / tst[0]) + log_p / 4) if tst[0] else 0.0
    ratio = tst[0] / (ref_words / max(len(rs) for rs in R))  # e2e-metrics pads every MR to the most references
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-beta * math.log(ratio) ** 2)
    return bleu, penalty * sum(i / max(t, 1) for i, t in zip(info, tst))


def _meteor_align(h, r):
    """(matches, chunks) of a greedy exact alignment that takes, left to right, the longest unused run."""
    where = defaultdict(list)
    for j, w in enumerate(r):
        where[w].append(j)
    used, align, i = [False] * len(r), [-1] * len(h), 0
    while i < len(h):
        run, start = 0, -1
        for j in where[h[i]]:
            n = 0
            while i + n < len(h) and j + n < len(r) and not used[j + n] and h[i + n] == r[j + n]:
                n += 1
            if n > run:
                run, start = n, j
        for n in range(run):
            align[i + n], used[start + n] = start + n, True
        i += max(run, 1)
    chunks = sum(1 for i, j in enumerate(align) if j >= 0 and (i == 0 or align[i - 1] != j - 1 or align[i - 1] < 0))
    return sum(j >= 0 for j in align), chunks


def _meteor(m, ch, lh, lr, alpha=0.85, beta=0.2, gamma=0.6):
    if m == 0:
        return 0.0
    p, r = m / lh, m / lr
    frag = 0.0 if (m == lh == lr and ch == 1) else ch / m  # Meteor 1.5: an identical pair is not fragmented
    return p * r / (alpha * p + (1 - alpha) * r) * (1 - gamma * frag ** beta)


def meteor_exact(hyps, refs):
    """Exact-match METEOR (Meteor 1.5 English parameters): best reference per MR, corpus score from sums."""
    tot = [0, 0, 0, 0]  # matches, chunks, hyp words, ref words
    for h, rs in zip(hyps, refs):
        h = coco_tokenize(h)
        stats = [(*_meteor_align(h, r), len(h), len(r)) for r in map(coco_tokenize, rs)]
        tot = [a + b for a, b in zip(tot, max(stats, key=lambda s: _meteor(*s)))]
    return _meteor(*tot)


def _lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyps, refs, beta=1.2):
    """coco-caption ROUGE-L: per MR, F_beta of the max precision and max recall over references; mean."""
    scores = []
    for h, rs in zip(hyps, refs):
        h, rs = coco_tokenize(h), [coco_tokenize(r) for r in rs]
        lcs = [_lcs(h, r) for r in rs]
        p = max(l / max(len(h), 1) for l in lcs)
        rec = max(l / max(len(r), 1) for l, r in zip(lcs, rs))
        scores.append((1 + beta ** 2) * p * rec / (rec + beta ** 2 * p) if p and rec else 0.0)
    return sum(scores) / len(scores)


def cider_d(hyps, refs, n=4, sigma=6.0):
    """coco-caption CIDEr-D: tf-idf n-gram cosine with clipping and a length penalty, x10, mean over MRs."""
    def counts(s):
        t = coco_tokenize(s)
        return Counter(g for k in range(1, n + 1) for g in _ngrams(t, k))

    H = [counts(h) for h in hyps]
    R = [[counts(r) for r in rs] for rs in refs]
    df = Counter(g for rs in R for g in {g for c in rs for g in c})  # MRs whose references hold the n-gram
    log_docs = math.log(len(R))

    def vec(c):
        v, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for g, tf in c.items():
            k = len(g) - 1
            v[k][g] = tf * (log_docs - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            length += tf if k == 1 else 0  # coco counts bigrams as the length
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for h, rs in zip(H, R):
        vh, nh, lh = vec(h)
        total = 0.0
        for r in rs:
            vr, nr, lr = vec(r)
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] and nr[k]:
                    val /= nh[k] * nr[k]
                total += val * math.exp(-(lh - lr) ** 2 / (2 * sigma ** 2))
        scores.append(10.0 * total / n / len(rs))
    return sum(scores) / len(scores)


def e2e_scores(hyps, refs):
    """{BLEU, NIST, METEOR, ROUGE_L, CIDEr} of one hypothesis per MR against that MR's references."""
    bleu, nist = bleu_nist(hyps, refs)
    return dict(BLEU=bleu, NIST=nist, METEOR=meteor_exact(hyps, refs), ROUGE_L=rouge_l(hyps, refs),
                CIDEr=cider_d(hyps, refs))


# -----------------------------------------------------------------------------
# Training script: arguments, checkpoints, the model from a run's arguments


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):  # a None default means "per method" or "off": the help says which
        return action.help if action.default is None else super()._get_help_string(action)


def get_args(argv=None):
    per_method = "\n".join(f"  {m:7s} " + (" ".join(f"{k}={v}" for k, v in d.items()) or "(nothing is trained)")
                           for m, d in METHOD_DEFAULTS.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=_HelpFormatter,
                                epilog="per-method defaults, for the flags left unset:\n" + per_method)
    a = p.add_argument
    # model
    a("--method", default="vblora", choices=["none", "full", *METHODS], help="fine-tuning method")
    a("--init_from", default="gpt2-medium", help=f"{' | '.join(GPT2_HEADS)} (from the Hub), scratch, or a "
      "local checkpoint file (.safetensors, .bin/.pt) or folder")
    a("--n_layer", type=int, default=12, help="scratch model only")
    a("--n_head", type=int, default=12, help="scratch model only")
    a("--n_embd", type=int, default=768, help="scratch model only")
    a("--block_size", type=int, default=1024, help="scratch model only")
    a("--dropout", type=float, default=0.0, help="model dropout (attention, residual, embedding)")
    a("--compile", action="store_true", help="torch.compile the training forward")
    # data
    a("--data_dir", default=None, help="folder with the official E2E CSVs (default: the Hub via `datasets`)")
    a("--bpe_dir", default=None, help="folder with vocab.bpe + encoder.json (no download); default: tiktoken's "
      "download or cache")
    a("--max_len", type=int, default=512, help="longest training example, in tokens (--lm_text: the block length)")
    a("--lm_text", default=None, help="FILE[,FILE]: plain language modelling on these UTF-8 text files instead of "
      "E2E (blocks of --max_len tokens, loss on every token, every 20th block for dev, no decoding)")
    # method: None = the method's default (epilog)
    a("--targets", default=None, help="comma list of Linear names, suffix match (per method)")
    a("--lora_r", type=int, default=None, help="LoRA rank (per method)")
    a("--lora_alpha", type=float, default=None, help="LoRA scale alpha/r (per method)")
    a("--lora_dropout", type=float, default=None, help="LoRA dropout on the adapter input (per method)")
    a("--sera_r", type=int, default=None, help="SeRA rank (per method)")
    a("--sera_split", type=int, default=None, help="SeRA segments (default: = --sera_r, the paper's default)")
    a("--sera_alpha", type=float, default=None, help="SeRA scale alpha/r (per method)")
    a("--sera_dropout", type=float, default=None, help="SeRA dropout on the adapter input (per method)")
    a("--siva_perc", type=float, default=None, help="SiVA: share of the variance left frozen (per method)")
    a("--bone_b", type=int, default=None, help="Bone block size (per method)")
    a("--bone_grouping", default=None, choices=["col", "row"], help="Bone grouping (per method)")
    a("--vblora_r", type=int, default=None, help="VB-LoRA rank (per method)")
    a("--vblora_b", type=int, default=None, help="VB-LoRA sub-vector length (per method)")
    a("--vblora_h", type=int, default=None, help="VB-LoRA bank size (per method)")
    a("--vblora_k", type=int, default=None, help="VB-LoRA top-k (per method)")
    # optimisation
    a("--lr", type=float, default=None, help="learning rate (per method)")
    a("--vblora_bank_lr", type=float, default=None, help="VB-LoRA vector bank lr (per method)")
    a("--vblora_logits_lr", type=float, default=None, help="VB-LoRA logits lr (per method)")
    a("--weight_decay", type=float, default=0.01, help="AdamW weight decay (none on VB-LoRA's bank and logits)")
    a("--warmup_iters", type=int, default=500, help="linear warm-up steps, cut to the run's steps when longer "
      "(then the lr reaches --lr at the last step, with no decay)")
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
    a("--out_dir", default="out-e2e", help="adapter.pt, ckpt.pt, predictions, references, metrics.json")
    a("--resume", action="store_true", help="continue the run in --out_dir/ckpt.pt; only --max_iters, --epochs, "
      "logging, eval and decoding flags may differ from that run's")
    a("--overwrite", action="store_true", help="start over in an --out_dir that holds a run")
    # decoding
    a("--beam", type=int, default=10, help="beam size")
    a("--length_penalty", type=float, default=0.8, help="hypothesis score = log p / length**this")
    a("--no_repeat_ngram", type=int, default=4, help="never repeat a generated n-gram of this size, 0 = off")
    a("--max_new_tokens", type=int, default=64, help="longest output")
    a("--decode_batch", type=int, default=16, help="test MRs decoded together (times beam rows)")
    a("--eval_samples", type=int, default=None, help="decode only the first N test MRs, 0 = none (default: all)")
    a("--sample", default=None, help='decode this one MR, e.g. "name[The Eagle], food[French]" (a | between '
      "fields reads as a comma), with --adapter or --out_dir/adapter.pt; no training")
    a("--adapter", default=None, help="adapter.pt for --sample (default: --out_dir/adapter.pt)")
    args = p.parse_args(argv)
    for k, v in METHOD_DEFAULTS[args.method].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


AT_LEAST_1 = ("n_layer", "n_head", "n_embd", "max_len", "epochs", "batch_size", "grad_accum", "log_interval",
              "eval_interval", "beam", "max_new_tokens", "decode_batch")
AT_LEAST_0 = ("dropout", "lr", "vblora_bank_lr", "vblora_logits_lr", "weight_decay", "warmup_iters", "max_iters",
              "grad_clip", "label_smoothing", "eval_iters", "no_repeat_ngram", "eval_samples")


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
    if args.resume and args.overwrite:
        raise SystemExit("error: --resume and --overwrite: pass one of them")
    if args.sample is not None and not re.sub(r"[\s|,]", "", args.sample):  # nothing but blanks and separators
        raise SystemExit(f'error: --sample {args.sample!r} is an empty MR; give one such as '
                         f'"name[The Eagle] | food[French]"')
    if args.lm_text is not None:
        for path in args.lm_text.split(","):
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                raise SystemExit(f"error: --lm_text {args.lm_text}: {path!r} is not a non-empty file")
    if args.resume and args.method == "none":
        raise SystemExit("error: --resume: --method none trains nothing, so there is no run to resume; drop "
                         "--resume to evaluate the base model")


def hms(seconds):
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def save_atomic(obj, path):
    """Write path + ".tmp", fsync it, rename it over path, fsync the folder: a crash leaves the old or the
    new file, never a torn one."""
    with open(path + ".tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CKPT_KEYS = ("args", "step", "trainable", "optimizer", "rng")
ADAPTER_KEYS = ("args", "method", "adapter", "config")


def load_checkpoint(path, keys=CKPT_KEYS):
    """torch.load a ckpt.pt (or, with keys=ADAPTER_KEYS, an adapter.pt); whatever is wrong with the file
    is one line naming it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # empty, truncated, not a torch file, a pickled payload
        why = (str(e).strip().splitlines() or ["the file ends early"])[0][:200]
        raise SystemExit(f"error: {path} is not a readable checkpoint (truncated or not a torch file): "
                         f"{type(e).__name__}: {why}")
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise SystemExit(f"error: {path} is not {'a ckpt.pt' if keys == CKPT_KEYS else 'an adapter.pt'} of "
                         f"train_gpt2.py: no {', '.join(missing)}")
    return obj


# flags a resume may change: they cannot alter the trained weights, or extend the run
RESUME_FREE = {"max_iters", "epochs", "log_interval", "eval_interval", "eval_iters", "device", "compile", "resume",
               "overwrite", "out_dir", "beam", "eval_samples", "decode_batch", "length_penalty",
               "no_repeat_ngram", "max_new_tokens", "sample", "adapter"}


def check_resume(saved_args, args):
    """Refuse a resume whose flags would alter the run, naming each changed flag and both values."""
    new = vars(args)
    changed = [f"--{k} {saved_args.get(k)} -> {new.get(k)}" for k in sorted(set(saved_args) | set(new))
               if k not in RESUME_FREE and saved_args.get(k) != new.get(k)]
    if changed:
        raise SystemExit(f"error: --resume: {', '.join(changed)} would alter the saved run; only "
                         f"{', '.join('--' + k for k in sorted(RESUME_FREE - {'resume', 'overwrite', 'sample', 'adapter'}))} "
                         f"may change (or start over with --overwrite)")


def build_model(args, vocab_size, weights=None, config=None):
    """The base model of a run: a random GPT from --seed (scratch; `config` when known) or GPT-2's weights
    from the local file `weights`. Seeds first, so a scratch base is the same model on every rebuild."""
    torch.manual_seed(args.seed)
    if args.init_from != "scratch":
        return load_gpt2(weights or args.init_from, args.dropout)
    config = config or dict(block_size=args.block_size, vocab_size=vocab_size, n_layer=args.n_layer,
                            n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    return GPT(GPTConfig(**config))


def load_finetuned(path, device="cpu"):
    """The fine-tuned model of an adapter.pt, ready to decode: the base model rebuilt from the run's
    arguments (--init_from, or --seed and the saved config for scratch), the method applied, the adapter
    loaded."""
    blob = load_checkpoint(path, ADAPTER_KEYS)
    args = argparse.Namespace(**blob["args"])
    weights = None
    if args.init_from != "scratch":
        try:
            weights = gpt2_weights(args.init_from, Online())
        except Missing as e:
            raise SystemExit(f"error: {path} was trained on {e.code}")
    model = build_model(args, blob["config"]["vocab_size"], weights, blob["config"])
    apply_method(model, args)
    if args.method in METHODS:
        METHODS[args.method][3](model, blob["adapter"])
    else:
        model.load_state_dict(blob["adapter"], strict=False)
    return model.to(device).eval()


def decode(model, prompts, eos, args, ctx, log=print):
    """Beam search over all prompts in batches of similar length, with a progress line and ETA."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths, little left-padding
    outs = [None] * len(prompts)
    n_batches = math.ceil(len(order) / args.decode_batch)
    t0 = time.time()
    for b in range(n_batches):
        ids = order[b * args.decode_batch:(b + 1) * args.decode_batch]
        with ctx:
            got = beam_search(model, [prompts[i] for i in ids], eos, args.beam, args.max_new_tokens,
                              args.length_penalty, args.no_repeat_ngram)
        for i, out in zip(ids, got):
            outs[i] = out
        done, el = min((b + 1) * args.decode_batch, len(order)), time.time() - t0
        if b % max(1, n_batches // 10) == 0 or done == len(order):
            log(f"decode {done}/{len(order)} MRs | elapsed {hms(el)} | eta {hms(el / done * (len(order) - done))}")
    return outs


def check_fits(block_size, prompt_len, args, what):
    if prompt_len + args.max_new_tokens > block_size:
        flag = "--block_size" if args.init_from == "scratch" else "the model's block_size"
        raise SystemExit(f"error: {flag} {block_size} is too short: {what} takes {prompt_len} tokens, "
                         f"+ --max_new_tokens {args.max_new_tokens} = {prompt_len + args.max_new_tokens}")


def sample(args, device):
    """--sample: decode one MR with a saved adapter and print the text."""
    path = args.adapter or os.path.join(args.out_dir, "adapter.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --sample needs an adapter.pt: no {path} (pass --adapter PATH or --out_dir DIR)")
    enc, _, _ = fetch_resources(args, what=("bpe",))
    model = load_finetuned(path, device)
    mr = re.sub(r"\s*\|\s*", ", ", args.sample.strip())  # "name[X] | food[Y]" -> E2E's "name[X], food[Y]"
    prompt = enc.encode_ordinary(mr) + [enc.eot_token]
    check_fits(model.config.block_size, len(prompt), args, "the MR")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with ctx:
        out = beam_search(model, [prompt], enc.eot_token, args.beam, args.max_new_tokens, args.length_penalty,
                          args.no_repeat_ngram)[0]
    text = " ".join(enc.decode(out).split())
    print(text)
    return dict(model=model, sample=text)


def main(argv=None):
    """The script; returns {model, step, predictions, scores, n_trainable, n_stored, train_loss (the last logged,
    label-smoothed as trained), dev_loss (the last), curve [(step, train loss)] per log line, dev_curve [(step,
    dev loss)] per --eval_interval, train_time (s, evaluation excluded), tokens_per_s} for tests, notebooks and
    reproduce.py."""
    # ---------------------------------------------------------------- args & ddp
    args = get_args(argv)
    check_args(args)
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
        cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world_size = 0, 1
        device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    master = rank == 0  # logs, evaluates, saves and decodes
    log = print if master else lambda *a, **k: None
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if args.sample is not None:
        return sample(args, device)
    ckpt_path, adapter_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "adapter.pt")
    if args.resume and not os.path.isfile(ckpt_path):
        raise SystemExit(f"error: --resume: no checkpoint at {ckpt_path}")
    if not args.resume and not args.overwrite:
        for path in (ckpt_path, adapter_path):
            if os.path.exists(path):
                raise SystemExit(f"error: {path} exists; pass --resume to continue that run or --overwrite to "
                                 f"start over")
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    if ckpt is not None:
        check_resume(ckpt["args"], args)
        if ckpt.get("world_size", 1) != world_size:
            raise SystemExit(f"error: --resume: {ckpt_path} was written by a run of {ckpt.get('world_size', 1)} "
                             f"process(es), this one has {world_size}: the global batch would change")

    # ---------------------------------------------------------------- data
    t0 = time.time()
    enc, data, weights = fetch_resources(args, what=("bpe", "weights") if args.lm_text else ("bpe", "e2e", "weights"))
    eos = enc.eot_token
    block_size = args.block_size if args.init_from == "scratch" else None  # a checkpoint's: known once loaded
    if block_size is None and args.lm_text:  # the blocks must fit the checkpoint's positions
        block_size = (load_gpt2(weights or args.init_from).config.block_size)
    max_len = min(args.max_len, block_size or args.max_len)
    if args.lm_text:
        train, dev = encode_lm_text(args.lm_text.split(","), enc, max_len)
        data = {"test": []}
    else:
        train = encode_e2e(data["train"], enc, max_len)
        dev = encode_e2e(data["dev"], enc, max_len)
    if not train:
        cap = f"--max_len {args.max_len}" + (f", --block_size {block_size}" if block_size else "")
        raise SystemExit(f"error: no training example fits in {max_len} tokens ({cap}): every MR takes as many")
    test_refs = defaultdict(list)  # MR -> its references, in file order
    for mr, ref in data["test"]:
        test_refs[mr].append(ref)
    mrs = list(test_refs)[:args.eval_samples]
    prompts = [enc.encode_ordinary(mr) + [eos] for mr in mrs]
    if args.lm_text:
        log(f"LM text: {len(train)} train, {len(dev)} dev blocks of {max_len} tokens (tokenised in "
            f"{time.time() - t0:.1f}s)")
    else:
        log(f"E2E: {len(train)} train, {len(dev)} dev examples, {len(test_refs)} test MRs "
            f"(tokenised in {time.time() - t0:.1f}s)")

    # ---------------------------------------------------------------- model & method
    model = build_model(args, enc.n_vocab, weights)  # seeded: the same base and adapter init on every rank
    if prompts:  # before training: the longest test MR and its output must fit the positions
        check_fits(model.config.block_size, max(map(len, prompts)), args, "the longest test MR")
    model.to(device)
    groups = apply_method(model, args)
    n_base = sum(p.numel() for n, p in model.named_parameters() if not any(
        s in n for s in ("lora_", "sera_", "siva_", "bone_", "vblora_")))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_stored = stored_param_count(model, args.method)
    log(f"method {args.method}: {n_train:,} trainable params, {n_stored:,} stored (base model {n_base:,})")
    torch.manual_seed(args.seed + rank)  # dropout differs per rank (nanoGPT's seed offset)
    raw_model = model
    train_model = torch.compile(model, dynamic=True) if args.compile else model
    if ddp and groups:  # every rank was built identically: no buffer (SiVA's bases) is re-sent each forward
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DDP).parameters else {"broadcast_buffers": False})  # torch < 2.13
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)

    # ---------------------------------------------------------------- optimizer
    n_batches = math.ceil(len(train) / args.batch_size)
    micro_per_step = args.grad_accum * world_size  # micro-batches of one optimizer step, over all ranks
    total = args.epochs * math.ceil(n_batches / micro_per_step) if groups else 0
    total = total if args.max_iters is None else min(total, args.max_iters)
    opt = torch.optim.AdamW(groups, fused=device.type == "cuda") if groups else None

    # ---------------------------------------------------------------- resume
    step = 0
    if ckpt is not None:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        extra, missing = sorted(set(ckpt["trainable"]) - trainable), sorted(trainable - set(ckpt["trainable"]))
        if extra or missing:
            raise SystemExit(f"error: --resume: {ckpt_path} holds other trainable tensors than this run: only in "
                             f"the checkpoint {extra[:4]}, only in this run {missing[:4]}")
        try:
            model.load_state_dict(ckpt["trainable"], strict=False)
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as e:  # shapes or parameter groups that differ
            raise SystemExit(f"error: --resume: {ckpt_path} does not fit this model: "
                             f"{' '.join(str(e).split())[:400]}")
        step = ckpt["step"]
        if master:  # the other ranks keep their seed offset
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        log(f"resumed from {ckpt_path} at step {step}")
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
    if ddp:
        dist.barrier()  # every rank has passed the checks above before rank 0 writes anything

    def save_checkpoint():
        save_atomic(dict(args=vars(args), step=step, world_size=world_size,
                         trainable={n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                         optimizer=opt.state_dict(),
                         rng=dict(torch=torch.get_rng_state(),
                                  cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)),
                    ckpt_path)

    dev_batches = make_batches([len(t) for t, _ in dev], args.batch_size, torch.Generator().manual_seed(0))
    dev_batches = dev_batches[:args.eval_iters]

    @torch.no_grad()
    def dev_loss():
        model.eval()
        losses = []
        for b in dev_batches:
            x, y = collate([dev[i] for i in b], eos)
            with ctx:
                losses.append(model(x.to(device), y.to(device))[1].item())
        model.train()
        return sum(losses) / max(len(losses), 1)

    # ---------------------------------------------------------------- training loop
    train_lengths = [len(t) for t, _ in train]
    params = [p for g in groups for p in g["params"]]
    epoch_batches = (None, None)  # (epoch, its batches), built when first needed
    model.train()
    t_start = t_log = time.time()
    loss_sum, tokens, n_logged, start_step = torch.zeros((), device=device), 0, 0, step  # since the last log line
    curve, dev_curve, train_loss, last_dev, tokens_seen, train_time = [], [], None, None, 0, 0.0  # the summary
    while step < total:
        f = lr_factor(step, args.warmup_iters, total)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        for micro in range(args.grad_accum):
            # global micro-batch m is batch i of epoch e's fixed shuffle: a resume sees the same data, and
            # rank r takes every world_size-th one, so N ranks see what one rank sees with N x --grad_accum
            m = (step * args.grad_accum + micro) * world_size + rank
            epoch, i = divmod(m, n_batches)
            if epoch_batches[0] != epoch:
                epoch_batches = (epoch, make_batches(train_lengths, args.batch_size,
                                                     torch.Generator().manual_seed(args.seed + epoch)))
            batch = [train[j] for j in epoch_batches[1][i]]
            x, y = collate(batch, eos)
            sync = not ddp or micro == args.grad_accum - 1  # all-reduce the gradients on the last one only
            with ctx, (nullcontext() if sync else train_model.no_sync()):
                _, loss = train_model(x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                      label_smoothing=args.label_smoothing)
                (loss / args.grad_accum).backward()  # DDP then averages over ranks
            loss_sum += loss.detach().float() / args.grad_accum
            tokens += sum(len(t) - 1 for t, _ in batch)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        n_logged += 1
        if step % args.log_interval == 0 or step == total:
            seen = torch.stack([loss_sum, torch.tensor(float(tokens), device=device)])
            if ddp:
                dist.all_reduce(seen)  # every rank's loss and tokens
            now = time.time()
            train_loss = seen[0].item() / n_logged / world_size
            curve.append((step, train_loss))
            tokens_seen, train_time = tokens_seen + seen[1].item(), train_time + now - t_log
            log(f"step {step}/{total} | loss {train_loss:.4f} | "
                f"lr {opt.param_groups[0]['lr']:.2e} | {seen[1].item() / (now - t_log):,.0f} tok/s | "
                f"elapsed {hms(now - t_start)} | eta {hms((now - t_start) / (step - start_step) * (total - step))}")
            loss_sum.zero_()
            tokens, n_logged, t_log = 0, 0, now
        if master and (step % args.eval_interval == 0 or step == total):
            last_dev = dev_loss()
            dev_curve.append((step, last_dev))
            log(f"step {step}: dev loss {last_dev:.4f}")
            save_checkpoint()
            t_log = time.time()  # tok/s counts training only
    if ddp:
        dist.destroy_process_group()
    result = dict(model=raw_model, step=step, predictions=[], scores={}, n_trainable=n_train, n_stored=n_stored,
                  train_loss=train_loss, dev_loss=last_dev, curve=curve, dev_curve=dev_curve, train_time=train_time,
                  tokens_per_s=tokens_seen / train_time if train_time else None)
    if not master:
        return result

    # ---------------------------------------------------------------- save
    if total == 0 and dev_batches:
        result["dev_loss"] = dev_loss()
        log(f"dev loss {result['dev_loss']:.4f}")
    save_atomic(dict(args=vars(args), method=args.method, config=asdict(raw_model.config),
                     adapter=adapter_state_dict(raw_model, args.method)), adapter_path)
    log(f"saved {adapter_path}")

    # ---------------------------------------------------------------- decode & score
    model.eval()
    if not mrs:
        return result
    t0 = time.time()
    preds = [" ".join(enc.decode(t).split()) for t in decode(model, prompts, eos, args, ctx, log)]  # one line each
    log(f"decoded {len(mrs)} test MRs in {time.time() - t0:.1f}s (beam {args.beam})")
    refs = [test_refs[mr] for mr in mrs]
    scores = e2e_scores(preds, refs)
    log(f"test ({len(mrs)} MRs): BLEU {100 * scores['BLEU']:.2f} | NIST {scores['NIST']:.4f} | "
        f"METEOR(exact) {100 * scores['METEOR']:.2f} | ROUGE-L {100 * scores['ROUGE_L']:.2f} | "
        f"CIDEr {scores['CIDEr']:.4f}")
    with open(os.path.join(args.out_dir, "predictions.txt"), "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for p in preds))
    with open(os.path.join(args.out_dir, "references.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join("".join(" ".join(r.split()) + "\n" for r in rs) for rs in refs))
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
        json.dump(dict(scores, method=args.method, step=step, n_mrs=len(mrs)), f, indent=1)
    result.update(predictions=preds, scores=scores)
    return result


if __name__ == "__main__":
    main()
