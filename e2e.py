"""The E2E NLG Challenge task, as build-nanogpt's hellaswag.py: its data, the GPT-2 BPE, and its metrics.

    enc = get_tokenizer()                           # tiktoken's GPT-2 encoding (or --bpe_dir's files)
    data = load_e2e()                               # {"train", "dev", "test"} -> [(context, completion)]
    train = encode_e2e(data["train"], enc, 512)     # [(tokens, n_prompt)]
    lora_line("name[Zizzi], eatType[pub]", "Zizzi's a pub.")  # "name : Zizzi | Type : pub||Zizzi 's a pub . "
    scores = e2e_scores(hypotheses, references)     # BLEU, NIST, METEOR, ROUGE_L, CIDEr

The data is E2E as microsoft/LoRA's examples/NLG ships it (data/e2e/{train,valid,test}.txt), token for token:
one `context||completion` line per official CSV row, the MR's fields renamed and both sides tokenized
(lora_line; docs/e2e-data.md gives its measured match). An example is tokens(context) + EOS +
tokens(' ' + completion) + EOS, as LoRA's gpt2_encode.py --add_bos --add_eos, and the loss is on the
completion and its final EOS only (collate). Batches are bucketed (make_batches: shuffle, sort by length
within windows of 50 batches, shuffle the batches) and right-padded to the longest example; causal attention
never lets a real token see a later pad. For plain language modelling, encode_lm_text cuts text files into
blocks (the literal `<|endoftext|>` in a file is EOS, between documents).

Metrics (on the test set, references grouped per MR; printed in the papers' units: BLEU, METEOR,
ROUGE-L x100). What the official e2e-metrics scripts do and how this file differs:
- BLEU-4 and NIST-5: mteval-v13a-sig.pl as e2e-metrics calls it: its tokeniser (punctuation split off,
  ASCII lowercased, no -c), corpus-level clipped counts, closest reference length (ties: shorter),
  its smoothing of zero n-gram matches (1/2^k for the k-th precision without a match), NIST information
  weights from all test references. NIST's length penalty compares the output words with the reference
  words divided by the mean number of references per MR (the Perl's $cum_ref_count / $cum_seg_count; the
  empty references e2e-metrics pads with do not count). Equal to the Perl's printed digits.
- METEOR, ROUGE-L, CIDEr-D come from coco-caption in e2e-metrics, which first runs the Stanford PTB
  tokenizer (lowercase, clitics split, punctuation dropped); here a regex approximation of it. ROUGE-L
  and CIDEr-D are coco's formulas exactly, so they differ from the official numbers only where the
  tokens do.
- METEOR: only exact matching is feasible in plain Python (no Meteor stems, WordNet synonyms,
  paraphrase table, or function-word weighting). Meteor 1.5 English parameters (alpha .85, beta .2,
  gamma .6), greedy chunk-minimising alignment, best reference per MR, corpus score from summed
  statistics. Official METEOR also credits stems, synonyms and paraphrases and weights function words,
  so the two differ, in either direction (docs/e2e-scores.md gives measured figures).
- ROUGE-L: per MR, F_beta (beta 1.2) of the max precision and the max recall over its references, taken
  separately (coco's rule); averaged over MRs.
- CIDEr-D: 1-4-grams counted with repeats, tf-idf with document frequencies over the test MRs' reference
  sets, clipped products min(tf-idf hyp, tf-idf ref) * tf-idf ref, Gaussian length penalty (sigma 6) on
  the bigram counts (coco's quirk), x10, averaged.
The training script writes predictions.txt (one per MR) and references.txt (LoRA's tokenized completions,
grouped by context as LoRA's gpt2_decode.py groups them, blank-line separated), the input of e2e-metrics'
measure_scores.py as they are.
"""
import csv
import io
import json
import math
import os
import re
from collections import Counter, defaultdict

import torch

from common import Missing
from model_gpt2 import IGNORE

E2E_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
LORA_FILES = {"train": "train.txt", "dev": "valid.txt", "test": "test.txt"}  # microsoft/LoRA examples/NLG/data/e2e
E2E_HUB = "tuetschek/e2e_nlg"  # its loading script no longer runs in datasets>=4; the Hub's parquet export does
GPT2_BPE_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                   "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"  # where tiktoken fetches them
BPE_FLAG = f"--bpe_dir DIR (holding vocab.bpe and encoder.json, from {BPE_URL.removeprefix('https://')})"
E2E_FLAG = (f"--data_dir DIR (holding {', '.join(E2E_FILES.values())}, from github.com/tuetschek/e2e-dataset, or "
            f"LoRA's {', '.join(LORA_FILES.values())})")


def in_tiktoken_cache():
    """Both BPE files in tiktoken's cache (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR or the temp folder's
    data-gym-cache), under the sha1 of their URL as tiktoken names them: then no download is needed."""
    import hashlib
    import tempfile
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR",
                                                                 os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    return bool(cache) and all(os.path.isfile(os.path.join(cache, hashlib.sha1((BPE_URL + f).encode()).hexdigest()))
                               for f in GPT2_BPE_SHA256)


def get_tokenizer(bpe_dir=None, online=lambda: True):
    """tiktoken's GPT-2 encoding from OpenAI's vocab.bpe + encoder.json (checked by hash): in bpe_dir when
    given, else tiktoken's cache, else its download."""
    import tiktoken
    if not bpe_dir:
        if not in_tiktoken_cache() and not online():
            raise Missing(f"GPT-2 BPE files vocab.bpe, encoder.json (tiktoken's download): pass {BPE_FLAG}")
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches its files from openaipublic.blob.core.windows.net
            raise Missing(f"GPT-2 BPE files vocab.bpe, encoder.json ({type(e).__name__}: {e}): pass {BPE_FLAG}")
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
    """{"train", "dev", "test"} -> [(context, completion)] in LoRA's form: LoRA's own train.txt, valid.txt and
    test.txt in data_dir, read as they are; else the official CSVs there, or the Hub's E2E, through lora_line."""
    if data_dir:
        lora = {s: os.path.join(data_dir, f) for s, f in LORA_FILES.items()}
        if all(os.path.isfile(p) for p in lora.values()):
            return {s: read_lora_txt(p) for s, p in lora.items()}
        paths = {s: os.path.join(data_dir, f) for s, f in E2E_FILES.items()}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise SystemExit(f"error: --data_dir {data_dir}: missing {', '.join(missing)} (or LoRA's "
                             f"{', '.join(LORA_FILES.values())})")
        return {s: lora_pairs(read_e2e_csv(p), test=s == "test") for s, p in paths.items()}
    if not online():
        raise Missing(f"E2E dataset {E2E_HUB} (the Hugging Face Hub): pass {E2E_FLAG}")
    try:
        import datasets
        ds = datasets.load_dataset(E2E_HUB, revision="refs/convert/parquet", data_files={
            "train": "default/train/*.parquet", "dev": "default/validation/*.parquet",
            "test": "default/test/*.parquet"})
    except Exception as e:  # the Hub unreachable, or datasets missing
        raise Missing(f"E2E dataset {E2E_HUB} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): pass "
                      f"{E2E_FLAG}")
    data = {s: list(zip(d["meaning_representation"], d["human_reference"])) for s, d in ds.items()}
    for s, rows in data.items():
        if not rows or not all(mr.strip() and ref.strip() for mr, ref in rows):
            raise SystemExit(f"error: the Hub's {E2E_HUB} {s} split is empty or has an empty field")
    return {s: lora_pairs(rows, test=s == "test") for s, rows in data.items()}


# -----------------------------------------------------------------------------
# E2E data


def read_utf8(path):
    """The text of a UTF-8 file (a BOM dropped); not UTF-8: an error naming the file and line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SystemExit(f"error: {path}, line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})")


def read_e2e_csv(path):
    """[(mr, ref)] from an official E2E CSV (header mr,ref; quoted fields; CRLF). Not UTF-8, no header, no
    rows, or a row without both fields: an error naming the file and line."""
    reader = csv.reader(io.StringIO(read_utf8(path), newline=""))
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


# LoRA's E2E files (examples/NLG/data/e2e/*.txt) hold one `context||completion` line per CSV row, in the CSV's
# order: the MR's fields renamed and joined by " | ", MR values and reference tokenized. Its train.txt and
# valid.txt (which the neural-template-gen E2E release shares) and its test.txt were tokenized by two different
# tokenizers; lora_line writes each (test=True: test.txt's). docs/e2e-data.md gives the measured match.
LORA_FIELDS = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}


def lora_tokenize(s, test=False):
    """A reference or MR value split into tokens as LoRA's E2E files have them, joined by single spaces."""
    if not test:  # "5. it": a number's period before a lowercase word stays on it
        s = re.sub(r"(?<!\S)(\d+)\.(?=\s+[a-z])", "\\1\0", s)
    # punctuation, "..", and a period unless within a number, starting a word (".Blue") or ending "St."
    s = re.sub(r"(\.\.+|[,!?;:()\"$]|(?<!St)(?:(?<![\d\s])\.|\.(?![\dA-Za-z])))", r" \1 ", s)
    s = re.sub(r"(?<!\S)£" if test else "£", " £ ", s)  # test.txt: "£" only at a word's start ("£ 20-£25")
    s = re.sub(r"(?<=[A-Za-z])-(?=[A-Za-z])|(?<=\d)-(?=\d)" + ("" if test else r"|(?<=\d)-(?=[A-Za-z])"), " - ", s)
    s = re.sub(r"(?<!\S)'(?=\S)" if test else r"(?<=\s)'(?=\S)", "' ", s)  # an opening quote
    s = re.sub(r"(?<=\S)'(?=\s|$)", " '", s)  # a closing quote
    s = re.sub(r"(?i)(?<=\w)('s|'re|'ll|'ve|'d|'m)\b", r" \1", s)
    s = re.sub(r"(?i)(?<=\w)(n't)\b" if test else r"(?i)(?<=\w)('t)\b", r" \1", s)  # "is n't" / "isn 't"
    return " ".join(s.split()).replace("\0", ".")


def lora_context(mr, test=False):
    """E2E's 'name[The Vaults], eatType[pub]' -> LoRA's 'name : The Vaults | Type : pub' (commas or | between)."""
    fields = re.findall(r"\s*([^\[\],|]+?)\s*\[(.*?)\]", mr)
    return " | ".join(f"{LORA_FIELDS.get(k, k)} : {lora_tokenize(v, test)}" for k, v in fields)


def lora_line(mr, ref, test=False):
    """LoRA's line (without its newline) for one official E2E CSV row; test=True: as in its test.txt."""
    return f"{lora_context(mr, test)}||{lora_tokenize(ref, test)} "


def lora_split(line):
    """(context, completion) of one LoRA line as format_converting_e2e.py reads it (the line stripped, split at
    ||); None when it is not two non-empty parts."""
    items = line.strip().split("||")
    return (items[0], items[1]) if len(items) == 2 and items[0].strip() and items[1].strip() else None


def lora_pairs(rows, test=False):
    """[(context, completion)] of official [(mr, ref)] rows: lora_line's two sides, as lora_split reads them."""
    return [(lora_context(mr, test), lora_tokenize(ref, test)) for mr, ref in rows]


def read_lora_txt(path):
    """[(context, completion)] from one of LoRA's E2E files, read as they are; a line that is not
    context||completion, a file not UTF-8 or empty: an error naming the file and line."""
    lines = read_utf8(path).replace("\r\n", "\n").split("\n")
    rows = []
    for i, line in enumerate(lines[:-1] if lines[-1] == "" else lines, 1):
        row = lora_split(line)
        if row is None:
            raise SystemExit(f"error: {path}, line {i}: expected context||completion, found {line!r}"[:300])
        rows.append(row)
    if not rows:
        raise SystemExit(f"error: {path} is empty (expected context||completion lines)")
    return rows


def encode_e2e(rows, enc, max_len):
    """[(tokens, n_prompt)] of (context, completion) rows, as LoRA's gpt2_encode.py --add_bos --add_eos:
    tokens = tokens(context) + EOS + tokens(' ' + completion) + EOS, cut at max_len; n_prompt =
    len(tokens(context)) + 1; a context of max_len tokens or more is dropped. Each distinct context is encoded
    once."""
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
    Every 20th block goes to dev. The literal `<|endoftext|>` in a file is the EOS token, GPT-2's mark between
    documents (so a model learns where a text ends); a file without it is one document."""
    tokens = []
    for path in paths:
        with open(path, encoding="utf-8") as f:  # any other special token's spelling stays plain text
            tokens += enc.encode(f.read(), allowed_special={"<|endoftext|>"}, disallowed_special=()) + [enc.eot_token]
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
    refs_per_mr = sum(len([r for r in rs if r]) for rs in R) / len(R)  # mteval: $cum_ref_count / $cum_seg_count
    ratio = tst[0] / (ref_words / refs_per_mr)  # output words over the mean words of one reference set
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
        t, c = coco_tokenize(s), Counter()
        for k in range(1, n + 1):
            c.update(_ngrams(t, k))  # term frequencies: "the" twice in a sentence counts 2
        return c

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


@torch.no_grad()
def estimate_dev_loss(model, dev, batches, eos, device, ctx):
    """Mean plain cross-entropy (no label smoothing) over these dev batches."""
    model.eval()
    losses = []
    for b in batches:
        x, y = collate([dev[i] for i in b], eos)
        with ctx:
            losses.append(model(x.to(device), y.to(device))[1].item())
    model.train()
    return sum(losses) / max(len(losses), 1)


def write_outputs(out_dir, preds, refs, metrics):
    """predictions.txt (one per MR) and references.txt (an MR's references, then a blank line), the input of
    the official e2e-metrics scripts; metrics.json, our scores."""
    with open(os.path.join(out_dir, "predictions.txt"), "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for p in preds))
    with open(os.path.join(out_dir, "references.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join("".join(" ".join(r.split()) + "\n" for r in rs) for rs in refs))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)


def e2e_scores(hyps, refs):
    """{BLEU, NIST, METEOR, ROUGE_L, CIDEr} of one hypothesis per MR against that MR's references."""
    bleu, nist = bleu_nist(hyps, refs)
    return dict(BLEU=bleu, NIST=nist, METEOR=meteor_exact(hyps, refs), ROUGE_L=rouge_l(hyps, refs),
                CIDEr=cider_d(hyps, refs))
