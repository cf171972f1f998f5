"""A compact GPT-2, as nanoGPT's model.py: the model, its Hugging Face checkpoints and beam search.

Module names are Hugging Face's, so a checkpoint loads key for key, except that q, k, v are three
nn.Linears `attn.q_proj/k_proj/v_proj`, split from HF's fused Conv1D `c_attn` on load, so that the
methods target them the way the papers count them. Every Linear is called as a module, so an adapter
swapped in for it is always used.

    model = load_gpt2(gpt2_weights("gpt2-medium", Online()))     # the Hub (cache first), or a local path
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256))      # a random model of any size
    outs = beam_search(model, [prompt_tokens], eos=50256)        # the LoRA code's E2E beam search
"""
import json
import math
import os
import pickle
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import Missing, check_size, read_safetensors, why

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
    is wte. A state dict already in our layout (e.g. a full fine-tune's adapter) passes through."""
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
    if "transformer.wte.weight" in out:
        out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def gpt2_layout(name):
    """interop's layout from our module names to Hugging Face's GPT2LMHeadModel's, for its adapters: q, k, v are
    parts 0, 1, 2 of the Conv1D attn.c_attn (weight (C, 3C), output [q | k | v]); every Conv1D is fan_in_fan_out."""
    m = re.fullmatch(r"(transformer\.h\.\d+\.attn)\.([qkv])_proj", name)
    if m:
        return f"{m[1]}.c_attn", "qkv".index(m[2]), 3, True
    conv1d = re.fullmatch(r"transformer\.h\.\d+\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)", name)
    return name, 0, 1, bool(conv1d)


def check_config(path, config, args=None):
    """A model config read from a file (a run's header), checked before GPT allocates it; args: the run's flags,
    which a scratch run's config was built from. Any fault is one line naming path and the field."""
    def bad(field, expected):
        raise SystemExit(f"error: {path}: its header's config.{field}={config.get(field)!r}: expected {expected}")

    if not isinstance(config, dict):
        raise SystemExit(f"error: {path}: its header's config={config!r}: expected the model's config as an object")
    unknown = sorted(set(config) - set(GPTConfig.__dataclass_fields__))
    if unknown:
        raise SystemExit(f"error: {path}: its header's config has fields GPTConfig has not: {unknown}")
    for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        v = config.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(k, "an int >= 1")
    if config["n_embd"] % config["n_head"]:
        bad("n_head", f"a divisor of config.n_embd={config['n_embd']}")
    for k in ("block_size", "n_layer", "n_head", "n_embd"):
        if args is not None and k in vars(args) and getattr(args, k) != config[k]:
            bad(k, f"args.{k}={getattr(args, k)!r}, the flag the run built it from")
    n_embd = config["n_embd"]
    check_size(path, config["n_layer"], n_embd, 4 * n_embd, config["vocab_size"] + config["block_size"])


def _read_weights(path):
    """(the state dict of a local checkpoint file, the model config its nanopeft header holds, or None); any fault
    is one line naming the file."""
    try:
        if path.endswith(".safetensors"):
            header, sd = read_safetensors(path)  # a full fine-tune's adapter.safetensors: its config in the header
        else:
            header, sd = None, torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SystemExit(f"error: --init_from {path}: holds pickled objects other than tensors; expected plain "
                         f"weights (nanopeft reads only tensors, weights_only=True)")
    except Exception as e:
        raise SystemExit(f"error: --init_from {path}: not a readable checkpoint (truncated, or not a "
                         f"safetensors/torch file): {why(e)}")
    method = (header or {}).get("args", {}).get("method")
    if header is not None and method != "full":
        raise SystemExit(f"error: --init_from {path}: the adapter of a --method {method} run holds no "
                         f"backbone; rebuild it with load_finetuned({path!r}), or start from a full fine-tune")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise SystemExit(f"error: --init_from {path}: not a state dict of tensors")
    return sd, (header or {}).get("config")


def load_gpt2(path, dropout=0.0, n_head=None):
    """Our GPT from a local GPT-2 checkpoint: a model.safetensors / pytorch_model.bin (HF layout), the
    folder holding one, or a full fine-tune's adapter.safetensors. n_head is not in the weights:
    the argument, else a config.json beside the file, else the model config saved with a full fine-tune, else
    n_embd / 64 (every GPT-2 size has 64-dim heads). Any fault is one line naming the file."""
    if os.path.isdir(path):
        names = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(path, f))]
        if not names:
            peft = " (a PEFT folder needs its adapter_config.json too)" if os.path.exists(
                os.path.join(path, "adapter_model.safetensors")) else ""
            raise SystemExit(f"error: --init_from {path}: no model.safetensors or pytorch_model.bin in that "
                             f"folder{peft}")
        path = os.path.join(path, names[0])
    if not os.path.isfile(path):
        raise SystemExit(f"error: --init_from {path}: not a GPT-2 size ({', '.join(GPT2_HEADS)}), 'scratch', "
                         f"or an existing file or folder")
    config_json = os.path.join(os.path.dirname(path), "config.json")
    if n_head is None and os.path.isfile(config_json):
        try:
            with open(config_json) as f:
                n_head = json.load(f).get("n_head")
        except (ValueError, AttributeError) as e:
            raise SystemExit(f"error: --init_from {path}: {config_json} is not a JSON object: {why(e)}")
    sd, saved = _read_weights(path)
    if n_head is None and isinstance(saved, dict):
        n_head = saved.get("n_head")
    sd = convert_hf_state_dict(sd)
    if "transformer.wte.weight" not in sd or "transformer.wpe.weight" not in sd:
        raise SystemExit(f"error: --init_from {path}: not a GPT-2 checkpoint (no wte/wpe); some keys: {list(sd)[:4]}")
    V, C = sd["transformer.wte.weight"].shape
    n_head = n_head or C // 64
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1 or C % n_head:
        raise SystemExit(f"error: --init_from {path}: n_head={n_head!r} (from config.json or the file's header): "
                         f"expected an int dividing n_embd={C}")
    n_layer = len([k for k in sd if k.endswith(".ln_1.weight")])
    config = GPTConfig(block_size=sd["transformer.wpe.weight"].shape[0], vocab_size=V, n_layer=n_layer,
                       n_head=n_head, n_embd=C, dropout=dropout)
    model = GPT(config)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
        raise SystemExit(f"error: --init_from {path}: does not fit a GPT-2 of n_layer {n_layer}, n_embd {C}: "
                         f"{why(e)}")
    return model


WEIGHTS_FLAG = "--init_from PATH (a model.safetensors or pytorch_model.bin, or its folder) or --init_from scratch"


def gpt2_weights(init_from, online):
    """A local file or folder for --init_from: itself, or the Hub checkpoint (cache first, then download)."""
    init_from = init_from.removeprefix("openai-community/")  # the Hub's name, as a PEFT folder writes it
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
                      f"{WEIGHTS_FLAG}")
    try:
        return hf_hub_download(repo, "model.safetensors")
    except Exception as e:
        raise Missing(f"GPT-2 weights {repo}/model.safetensors ({why(e)}): "
                      f"pass {WEIGHTS_FLAG}")


# -----------------------------------------------------------------------------
# Beam search with a KV cache, batched over prompts


def ban_repeats(logits, hist, n):
    """-inf on every token that would repeat an n-gram of hist (fairseq's no_repeat_ngram_size)."""
    win = hist.unfold(1, n, 1)  # (R, t-n+1, n): every n-gram generated so far
    suffix = hist[:, None, hist.size(1) - n + 1:]  # (R, 1, n-1): the last n-1 tokens
    hit = (win[:, :, :-1] == suffix).all(-1)  # (R, t-n+1): n-grams that this suffix would repeat
    r, w = hit.nonzero(as_tuple=True)
    return logits.index_put((r, win[r, w, -1]), torch.tensor(float("-inf"), device=logits.device))


@torch.no_grad()
def beam_search(model, prompts, eos, beam=10, max_new_tokens=64, length_penalty=0.8, no_repeat_ngram=4):
    """Continuations (token lists, EOS cut) of a batch of prompts, all beams of all prompts in one batch.

    The LoRA code's E2E beam search (examples/NLG/src/gpt2_beam.py, reused by VB-LoRA and SiVA), step for
    step: the tokens that would repeat an n-gram of the generated tokens (the prompt's are not counted) are
    set to -inf on the logits, then log_softmax, so the surviving tokens' probabilities sum to 1; each step
    keeps the `beam` sequences with the highest summed log-probability (ties to the first found); a
    sequence that emits EOS leaves the beam as a finished hypothesis scored sum / length**length_penalty
    (length = generated tokens with EOS) and its slot is not refilled; no early stop: decoding runs until
    every beam has finished or max_new_tokens, after which the live beams count as hypotheses too.
    transformers' generate differs by design: it bans n-grams over prompt and output, refills a finished
    beam's slot from the next candidates and may stop early (early_stopping).
    Decoding stops on `eos` alone, not also on "\n\n" (token 628) as LoRA's E2E command does: our
    targets end with EOT (encode_e2e) and no E2E reference holds "\n\n", so a trained model ends on EOT.
    Prompts are left-padded: pads are masked out of attention and positions count from each prompt's
    first real token.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}: must be >= 1")
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
        logits = logits[:, -1].float()  # (B*K, V)
        if 0 < no_repeat_ngram <= t:
            logits = ban_repeats(logits, hist, no_repeat_ngram)  # before the softmax: the rest renormalise
        logp = F.log_softmax(logits, dim=-1)  # (B*K, V)
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
