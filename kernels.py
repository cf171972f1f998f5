"""Triton kernels for the adapters: a tutorial, one section per op.

A method file's forward is the paper's formula in plain PyTorch. One line before it, it hands over to this
file when `applies(...)` says a kernel can run (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1):

    if _kernels is not None and _kernels.applies(x, self.lora_A):
        return _kernels.lowrank_linear(x, W, bias, A, B, d, scale, dropout=p)
    return <the formula>

Without triton (macOS, Windows, a CPU box) the file still imports, since transformers >= 5 imports whatever
top-level module is called `kernels`: `applies` then says no and every op raises. `NANOPEFT_KERNELS = True`
marks the file as ours; a method file uses a `kernels` module only when it carries that mark (Hugging Face
has a package of the same name).

Contents (the ops, in the method files' order; x (..., in), W (out, in), N = rows of x):

    1. lowrank_linear(x, W, bias, A, B, d, scale, dropout)       LoRA (d = None), SiVA (A = V_k, B = U_k,
         x W^T + bias + scale * ((dropout(x) A^T) * d) B^T          d = s), VB-LoRA (A, B composed)
       dropout_mask(seed, rows, cols, p)                         the keep-mask those kernels draw
    2. sera_delta(x, A, C, B, scale)                             SeRA
         scale * x blockdiag(A) C blockdiag(B)
    3. vblora_compose(logits, bank, k)                           VB-LoRA (all layers' sub-vectors at once)
         Σ_{i in topk} softmax(topk logits)_i * bank[idx_i]
    4. bone_row(x, B)                                            Bone, row grouping (prologue of the layer)
         (x + t, Σ_j t_j),  t_j = x_j B_j^T
    5. bone_col_linear(x, W, B, bias)                            Bone, col grouping
         x W'^T + bias,  W'_ij = W_ij + W_ij B_i + B_i  (W' transient)

Every section reads: the maths -> `_<op>_fwd_kernel` -> `_<op>_bwd_kernel` (its gradient written above it)
-> host launchers -> `<Op>Function` -> `<op>_reference` (plain PyTorch, what the tests compare with) ->
the public op. `python bench.py` times each op against its reference.

Design choices shared by the ops (the papers say nothing about kernels):
- The low-rank path is fused: one program per BLOCK_M rows computes h = x A^T over `in`, keeps it in
  registers, scales it by d and adds h B^T into the base output y tile by tile, in place. The (N, r)
  intermediate reaches memory only as the fp32 copy of h the backward needs. The base product x W^T stays
  with cuBLAS; in backward the low-rank dx is added into cuBLAS's g W in place (one (N, in) buffer).
- Backward in two passes, both deterministic (no atomics): a row pass (one program per row block) forms
  the small per-row quantities (g B, dx, the (N, r) factors of the weight gradients, per-block partials
  of the r- or r x r-sized gradients); a column pass (`_weight_grad_kernel`) reduces U^T V over the rows
  for the (r, in) / (r, out) weight gradients, split along N into a few fixed chunks whose fp32 partials
  torch sums. The result is bit-reproducible run to run.
- LoRA's dropout is drawn inside the kernels ("Low-Memory Dropout"): the mask is a pure function of a
  seed and the element's offset, regenerated in backward, never stored.
- tl.dot needs every dimension >= 16: the rank is padded to a power of two >= 16 with masked loads.
  Above rank 128, h no longer fits in registers beside the tiles: such calls run the reference (two
  cuBLAS GEMMs are the right tool there).
- Dtypes: fp32, bf16 and fp16 tensors are loaded in their own dtype (fp32 adapter parameters may meet
  bf16 activations); dot operands are cast to the compute dtype (autocast's when it is on, else x's);
  accumulation is fp32. fp32 dots follow torch's TF32 switch (IEEE by default) so fp32 results match
  torch.matmul. Under TRITON_INTERPRET=1 the operands are cast to fp32: the interpreter's bf16/fp16
  tl.dot returns garbage (triton 3.9).
- Block sizes: one heuristic picks the row block so the grid covers the GPU's SMs; column tiles are 64
  wide on a GPU and 32 under the interpreter (tests' small shapes still cross tile borders). Only the
  low-rank forward, the hot path of three methods, is autotuned (tile widths, pipelining), keyed on the
  layer's sizes and not on N, so a new batch length does not re-tune.
- int64 offsets: program ids are cast to int64 before they multiply a row stride.

Kernel arguments follow one naming scheme: `<t>_ptr` for tensor t; rows are m (BLOCK_M), input features
k (BLOCK_K), output features n (BLOCK_N), rank r (BLOCK_R); `stride_xm` is x's row stride.
"""
import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

NANOPEFT_KERNELS = True  # the mark a method file checks before it uses this module


class _NoTriton:
    """Stands in for `triton` and `triton.language` where triton is not installed, so that the definitions
    below still run: `@triton.jit` and `@triton.autotune(...)` hand the function back unchanged, and any
    other name (`tl.constexpr`, `tl.float32`, `triton.Config(...)`) is another stand-in. Nothing defined with
    it ever launches: without triton `applies` is False and every op raises."""

    def __getattr__(self, name):
        return _NoTriton()

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # used as a decorator
        return _NoTriton()


if not HAS_TRITON:
    triton = tl = _NoTriton()


# -----------------------------------------------------------------------------------------------------
# Shared helpers


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def applies(*tensors):
    """True iff a kernel may run on these tensors: NANOPEFT_NO_TRITON is not "1" (read now, so tests and
    bench.py can flip it), triton is installed, every tensor is fp32/bf16/fp16, all on one device, and that device is CUDA (or
    the CPU under TRITON_INTERPRET=1). None entries (an absent optional tensor) are ignored."""
    if not HAS_TRITON or os.environ.get("NANOPEFT_NO_TRITON") == "1":
        return False
    device = None
    for t in tensors:  # a plain loop: on a CPU this function is all of kernels.py that runs
        if t is None:
            continue
        device = t.device if device is None else device
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or t.device != device:
            return False
        if not (t.is_cuda or (_interpreting() and t.device.type == "cpu")):
            return False
    return True


def _check_applies(op, *tensors):
    if not HAS_TRITON:
        raise RuntimeError(f"kernels.{op}: triton is not installed (pip install triton, Linux only); call "
                           f"{op}_reference instead")
    if not applies(*tensors):
        raise RuntimeError(f"kernels.{op}: no kernel applies to these tensors (they must be fp32/bf16/fp16 on "
                           f"one CUDA device, or on the CPU with TRITON_INTERPRET=1, and NANOPEFT_NO_TRITON "
                           f"unset); call {op}_reference instead")


def _compute_dtype(x):
    """The dtype products run in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _dot_config(dtype):
    """(DOT, PREC) constexprs for tl.dot: the operand dtype and the fp32 input precision."""
    if _interpreting():
        return tl.float32, "ieee"
    if dtype == torch.float32:
        return tl.float32, ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    return _TL_DTYPE[dtype], "ieee"


BLOCK_CUDA = 64  # column tile width on a GPU
BLOCK_INTERPRET = 32  # under the interpreter: small test shapes still span several tiles
_MAX_RANK = 128  # above this h does not fit in registers beside the tiles: the reference runs instead
_SPLIT_TARGET = 512  # Bone's dB reductions split until about this many programs run


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _block(t):
    """Column tile width for tensors like t."""
    return BLOCK_INTERPRET if _interpreting() or not t.is_cuda else BLOCK_CUDA


def _rank_block(r):
    return max(16, triton.next_power_of_2(r))


def _row_block(N, block_r, t):
    """Rows per program: the largest of 64/32 that still gives every SM a program (and keeps the
    (rows, rank) fp32 tiles small), else 16."""
    if _interpreting() or not t.is_cuda:
        return BLOCK_INTERPRET
    for bm in (64, 32):
        if bm * block_r <= 4096 and triton.cdiv(N, bm) >= _sm_count(t.device.index):
            return bm
    return 16


def _rows(t, n):
    """t viewed as (rows, n) with unit column stride (copies only if it has to)."""
    t = t.reshape(-1, n)  # (N, n)
    return t if t.stride(1) == 1 else t.contiguous()


# LoRA's dropout, as in the Triton tutorial "Low-Memory Dropout": element e of x (flat offset
# row * in + col, int64) is kept iff tl.rand(seed, e) >= p, and kept values are scaled by 1 / (1 - p). The
# mask is a pure function of (seed, offset), so the forward and both backward kernels regenerate it where
# they read x. The seed is a (1,) device tensor drawn at each forward, so CUDA-graph replays draw afresh.
@triton.jit
def _dropout(x, seed, offsets, p):
    keep = tl.rand(seed, offsets) >= p
    return tl.where(keep, x.to(tl.float32) * (1.0 / (1.0 - p)), 0.0)


@triton.jit
def _dropout_mask_kernel(seed_ptr, out_ptr, numel, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(tl.load(seed_ptr), offs) >= p
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < numel)


# The column pass: W = U^T V summed over rows, for the (r, M) weight gradients dA = gh^T x, dB^T = hd^T g
# (and SeRA's block versions). Both of a layer's products go in one launch (a launch costs host time):
# grid (column tiles of problem 1, then of problem 2; row splits). Each program reduces its split's rows
# into a fp32 partial W[split] of one (R, M1 + M2) buffer; the host sums the few partials in a fixed order.
@triton.jit
def _weight_grad_tile(u_ptr, v_ptr, w_ptr, pid_n, pid_s, N, M, R, stride_vm, stride_wr, rows_per_split,
                      seed, p_drop, DROPOUT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    cmask, rkmask = cols < M, ranks < R
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    start = pid_s * rows_per_split
    for m0 in range(0, rows_per_split, BLOCK_M):
        rows = start + m0 + tl.arange(0, BLOCK_M)
        rmask = rows < N
        u = tl.load(u_ptr + rows[:, None] * R + ranks[None, :], mask=rmask[:, None] & rkmask[None, :], other=0.0)
        v = tl.load(v_ptr + rows[:, None] * stride_vm + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        if DROPOUT:  # v is x: the mask the forward drew (element offsets row * M + col, M = in)
            v = _dropout(v, seed, rows[:, None] * M + cols[None, :], p_drop)
        acc = tl.dot(tl.trans(u).to(DOT), v.to(DOT), acc, input_precision=PREC)
    tl.store(w_ptr + ranks[:, None] * stride_wr + cols[None, :], acc, mask=rkmask[:, None] & cmask[None, :])


@triton.jit
def _weight_grad_kernel(
    u1_ptr, v1_ptr,  # problem 1: (N, R) fp32 row factors, contiguous; (N, M1), unit column stride
    u2_ptr, v2_ptr,  # problem 2: the same with M2 columns (M2 = 0: no problem 2)
    w_ptr,  # (SPLITS, R*M1 + R*M2) fp32 partial sums: per split, (R, M1) then (R, M2), each row-major
    N, M1, M2, R,
    stride_v1m, stride_v2m,  # row strides of v1, v2
    rows_per_split,  # a multiple of BLOCK_M
    seed_ptr, p_drop,  # LoRA's dropout on v1 (= x): read only if DROPOUT1
    DROPOUT1: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    tiles1 = tl.cdiv(M1, BLOCK_N)
    w = w_ptr + pid_s * R * (M1 + M2)
    seed = 0
    if DROPOUT1:
        seed = tl.load(seed_ptr)
    if pid_n < tiles1:
        _weight_grad_tile(u1_ptr, v1_ptr, w, pid_n, pid_s, N, M1, R, stride_v1m, M1, rows_per_split,
                          seed, p_drop, DROPOUT1, DOT, PREC, BLOCK_M, BLOCK_N, BLOCK_R)
    else:
        _weight_grad_tile(u2_ptr, v2_ptr, w + R * M1, pid_n - tiles1, pid_s, N, M2, R, stride_v2m, M2,
                          rows_per_split, seed, p_drop, False, DOT, PREC, BLOCK_M, BLOCK_N, BLOCK_R)


def _weight_grads(u1, v1, u2, v2, dot, prec, seed=None, p=0.0):
    """(u1^T v1, u2^T v2), each (R, M) fp32, in one launch; u (N, R) fp32 contiguous, v (N, M) with unit
    column stride. A pair passed as None gives None. With a seed, v1 is x under LoRA's dropout p."""
    N, R = (u1 if u1 is not None else u2).shape
    M1 = v1.shape[1] if u1 is not None else 0
    M2 = v2.shape[1] if u2 is not None else 0
    has1, has2 = u1 is not None, u2 is not None
    if not has1:  # an absent problem has 0 columns: no program reads its (placeholder) pointers
        u1, v1 = u2, v2
    if not has2:
        u2, v2 = u1, v1
    bm = bn = _block(u1)
    target = 4 if _interpreting() or not u1.is_cuda else 2 * _sm_count(u1.device.index)
    col_tiles, row_blocks = triton.cdiv(M1, bn) + triton.cdiv(M2, bn), triton.cdiv(N, bm)
    splits = min(row_blocks, max(1, target // col_tiles))  # enough programs to fill the GPU, no more
    rows_per_split = triton.cdiv(row_blocks, splits) * bm
    splits = triton.cdiv(N, rows_per_split)
    w = torch.empty(splits, R * (M1 + M2), device=u1.device, dtype=torch.float32)
    _weight_grad_kernel[(col_tiles, splits)](
        u1, v1, u2, v2, w, N, M1, M2, R, v1.stride(0), v2.stride(0), rows_per_split,
        seed if seed is not None else w, float(p), DROPOUT1=seed is not None and has1,
        DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=_rank_block(R), num_warps=4,
    )
    w1, w2 = w.sum(0).split([R * M1, R * M2])  # (R*M1,), (R*M2,)
    return (w1.view(R, M1) if has1 else None), (w2.view(R, M2) if has2 else None)


# -----------------------------------------------------------------------------------------------------
# 1. The low-rank path (LoRA, SiVA, VB-LoRA)
#
#   y = x W^T + bias + s * ((x~ A^T) * d) B^T,   x~ = dropout(x),  A (R, IN), B (OUT, R), d (R,) or 1
#
# cuBLAS computes y0 = x W^T + bias; the forward kernel adds the low-rank part into y0 in place. One program
# owns BLOCK_M rows: it accumulates h = x~ A^T (BLOCK_M, R) over IN, saves h (fp32) if a gradient needs it,
# then walks OUT in BLOCK_N tiles adding (s * h * d) B^T into y.

def _lowrank_linear_configs():
    if _interpreting():  # one small config: nothing to tune, tests stay fast
        return [triton.Config({"BLOCK_N": BLOCK_INTERPRET, "BLOCK_K": BLOCK_INTERPRET})]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
                                 (128, 128, 4, 4), (256, 64, 8, 3)]]


# BLOCK_M comes from the row heuristic (so the grid is known before tuning); the key leaves out N, so a
# new batch length does not re-tune. The kernel adds into y: every trial must start from the same y.
@triton.autotune(configs=_lowrank_linear_configs(), key=["IN", "OUT", "BLOCK_R", "BLOCK_M"],
                 restore_value=["y_ptr"])
@triton.jit
def _lowrank_linear_fwd_kernel(
    x_ptr,  # (N, IN) input, unit column stride
    a_ptr,  # (R, IN) down projection
    b_ptr,  # (OUT, R) up projection
    d_ptr,  # (R,) per-rank scale; read only if HAS_D
    y_ptr,  # (N, OUT) base output, updated in place, unit column stride
    h_ptr,  # (N, R) fp32: h = x~ A^T saved for the backward; written only if SAVE_H
    seed_ptr,  # (1,) int64 dropout seed; read only if DROPOUT
    N, IN, OUT, R,
    stride_xm, stride_ym, stride_ar, stride_ak, stride_bn, stride_br,
    scale, p_drop,
    HAS_D: tl.constexpr, SAVE_H: tl.constexpr, DROPOUT: tl.constexpr,  # DROPOUT: x -> dropout(x, p_drop)
    DOT: tl.constexpr, PREC: tl.constexpr,  # dot operand dtype, fp32 input precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rmask, rkmask = rows < N, ranks < R
    if DROPOUT:
        seed = tl.load(seed_ptr)
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < IN
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        if DROPOUT:
            x = _dropout(x, seed, rows[:, None] * IN + cols[None, :], p_drop)
        at = tl.load(a_ptr + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                     mask=cmask[:, None] & rkmask[None, :], other=0.0)  # (BLOCK_K, BLOCK_R) = A^T tile
        h = tl.dot(x.to(DOT), at.to(DOT), h, input_precision=PREC)
    if SAVE_H:
        tl.store(h_ptr + rows[:, None] * R + ranks[None, :], h, mask=rmask[:, None] & rkmask[None, :])
    if HAS_D:
        h = h * tl.load(d_ptr + ranks, mask=rkmask, other=0.0).to(tl.float32)[None, :]
    hs = (h * scale).to(DOT)
    for n0 in range(0, OUT, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        omask = outs < OUT
        bt = tl.load(b_ptr + outs[None, :] * stride_bn + ranks[:, None] * stride_br,
                     mask=rkmask[:, None] & omask[None, :], other=0.0)  # (BLOCK_R, BLOCK_N) = B^T tile
        yp = y_ptr + rows[:, None] * stride_ym + outs[None, :]
        ym = rmask[:, None] & omask[None, :]
        acc = tl.load(yp, mask=ym, other=0.0).to(tl.float32)
        acc = tl.dot(hs, bt.to(DOT), acc, input_precision=PREC)
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ym)


# Backward. With g = dL/dy (N, OUT), h = x~ A^T (N, R), s = scale:
#   gB = g B                   (N, R)
#   dB = s * g^T (h * d)       (OUT, R)  = (hd^T g)^T with hd = s * h * d   -> column pass
#   gh = s * gB * d            (N, R)    the gradient reaching h
#   dx = g W + gh A            (N, IN)   cuBLAS's g W, the low-rank part added by this kernel
#   dA = gh^T x~               (R, IN)   -> column pass
#   dd = s * Σ_rows h * gB     (R,)      -> per-row-block partials here, summed on the host
# One program per BLOCK_M rows: loop over OUT for gB, then over IN for dx; it stores gh and hd (N, R) fp32
# for the column pass. With dropout, x~ = m * x / (1 - p) (m regenerated from the seed), so the low-rank dx
# is (gh A) * m / (1 - p) and dA = gh^T x~; h came from x~, so dB and dd need nothing more.
@triton.jit
def _lowrank_linear_bwd_kernel(
    g_ptr,  # (N, OUT) output gradient, unit column stride
    h_ptr,  # (N, R) fp32 h saved by the forward
    a_ptr,  # (R, IN)
    b_ptr,  # (OUT, R)
    d_ptr,  # (R,) read only if HAS_D
    dx_ptr,  # (N, IN) contiguous, written only if NEED_DX
    gh_ptr,  # (N, R) fp32 gh, written only if NEED_GH
    hd_ptr,  # (N, R) fp32 s * h * d, written only if NEED_HD
    dd_ptr,  # (row blocks, R) fp32 partial dd, written only if NEED_DD
    seed_ptr,  # (1,) int64 dropout seed; read only if DROPOUT
    N, IN, OUT, R,
    stride_gm, stride_ar, stride_ak, stride_bn, stride_br,
    scale, p_drop,
    HAS_D: tl.constexpr, NEED_DX: tl.constexpr, NEED_GH: tl.constexpr, NEED_HD: tl.constexpr,
    NEED_DD: tl.constexpr, ACC_DX: tl.constexpr,  # ACC_DX: add into dx (the base layer's g W) in place
    DROPOUT: tl.constexpr,  # the forward's x was dropout(x): dx's low-rank part goes through the same mask
    DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rmask, rkmask = rows < N, ranks < R
    hmask = rmask[:, None] & rkmask[None, :]
    h = tl.load(h_ptr + rows[:, None] * R + ranks[None, :], mask=hmask, other=0.0)
    gb = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, OUT, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        omask = outs < OUT
        g = tl.load(g_ptr + rows[:, None] * stride_gm + outs[None, :], mask=rmask[:, None] & omask[None, :],
                    other=0.0)
        b = tl.load(b_ptr + outs[:, None] * stride_bn + ranks[None, :] * stride_br,
                    mask=omask[:, None] & rkmask[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
        gb = tl.dot(g.to(DOT), b.to(DOT), gb, input_precision=PREC)
    gb = gb * scale
    if HAS_D:
        d = tl.load(d_ptr + ranks, mask=rkmask, other=0.0).to(tl.float32)
        gh = gb * d[None, :]
        hd = h * d[None, :] * scale
        if NEED_DD:
            tl.store(dd_ptr + pid * R + ranks, tl.sum(h * gb, axis=0), mask=rkmask)
    else:
        gh = gb
        hd = h * scale
    if NEED_GH:
        tl.store(gh_ptr + rows[:, None] * R + ranks[None, :], gh, mask=hmask)
    if NEED_HD:
        tl.store(hd_ptr + rows[:, None] * R + ranks[None, :], hd, mask=hmask)
    if NEED_DX:
        if DROPOUT:
            seed = tl.load(seed_ptr)
        ghd = gh.to(DOT)
        for k0 in range(0, IN, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < IN
            a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
                        mask=rkmask[:, None] & cmask[None, :], other=0.0)  # (BLOCK_R, BLOCK_K)
            dxp = dx_ptr + rows[:, None] * IN + cols[None, :]
            dmask = rmask[:, None] & cmask[None, :]
            dx = tl.dot(ghd, a.to(DOT), input_precision=PREC)
            if DROPOUT:
                dx = _dropout(dx, seed, rows[:, None] * IN + cols[None, :], p_drop)
            if ACC_DX:
                dx += tl.load(dxp, mask=dmask, other=0.0).to(tl.float32)
            tl.store(dxp, dx.to(dx_ptr.dtype.element_ty), mask=dmask)


def _lowrank_linear_fwd(y, x, A, B, d, scale, h, dot, prec, seed=None, p=0.0):
    """y (N, OUT) += scale * ((x~ A^T) * d) B^T in place; h (N, R) fp32 receives x~ A^T when not None. With a
    seed, x~ is x dropped out with probability p inside the kernel; else x~ = x."""
    N, IN = x.shape
    OUT, R = B.shape
    block_r = _rank_block(R)
    bm = _row_block(N, block_r, x)
    _lowrank_linear_fwd_kernel[(triton.cdiv(N, bm),)](
        x, A, B, d if d is not None else A, y, h if h is not None else x, seed if seed is not None else x,
        N, IN, OUT, R, x.stride(0), y.stride(0), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        scale, float(p),
        HAS_D=d is not None, SAVE_H=h is not None, DROPOUT=seed is not None, DOT=dot, PREC=prec,
        BLOCK_M=bm, BLOCK_R=block_r,
    )


def _lowrank_linear_bwd(g, x, A, B, d, h, scale, need, dot, prec, dx=None, seed=None, p=0.0):
    """Gradients (dx, dA, dB, dd) for the flags in need = (x, A, B, d); None where not needed. A given dx
    (N, IN) contiguous receives the low-rank part of the input gradient added in place."""
    need_x, need_A, need_B, need_d = need
    N, IN = x.shape
    OUT, R = B.shape
    block_r = _rank_block(R)
    bm = _row_block(N, block_r, x)
    blocks = triton.cdiv(N, bm)
    f32 = dict(device=x.device, dtype=torch.float32)
    acc_dx = dx is not None
    if need_x and dx is None:
        dx = torch.empty(N, IN, device=x.device, dtype=x.dtype)
    gh = torch.empty(N, R, **f32) if need_A else None
    hd = torch.empty(N, R, **f32) if need_B else None
    dd = torch.empty(blocks, R, **f32) if need_d else None
    bn = bk = _block(x)
    _lowrank_linear_bwd_kernel[(blocks,)](
        g, h, A, B, d if d is not None else A,
        dx if need_x else h, gh if need_A else h, hd if need_B else h, dd if need_d else h,
        seed if seed is not None else h,
        N, IN, OUT, R, g.stride(0), A.stride(0), A.stride(1), B.stride(0), B.stride(1), scale, float(p),
        HAS_D=d is not None, NEED_DX=need_x, NEED_GH=need_A, NEED_HD=need_B, NEED_DD=need_d, ACC_DX=acc_dx,
        DROPOUT=seed is not None,
        DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, num_warps=4,
    )
    dA, dBt = _weight_grads(gh, x, hd, g, dot, prec, seed, p) if (need_A or need_B) else (None, None)
    dA = dA.to(A.dtype) if need_A else None  # (R, IN)
    dB = dBt.t().to(B.dtype) if need_B else None  # (OUT, R), from (R, OUT)
    dd = dd.sum(0).to(d.dtype) if need_d else None  # (R,)
    return dx, dA, dB, dd


class LowRankLinearFunction(torch.autograd.Function):
    """x W^T + bias + scale * ((x~ A^T) * d) B^T: cuBLAS for the base product, the forward kernel added into
    its output; in backward the low-rank dx added into cuBLAS's g W in place. Products run in the compute
    dtype (autocast's when on), as nn.Linear's would; W is cast once and the cast kept for backward, as
    autocast itself does. dW and dbias are computed only if they require grad."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, d, scale, p, seed):
        ct = _compute_dtype(x)
        x2 = _rows(x, x.shape[-1]).to(ct)  # (N, in)
        Wc = W.to(ct)
        y = F.linear(x2, Wc, None if bias is None else bias.to(ct))  # (N, out)
        save_h = any(ctx.needs_input_grad[3:6])
        h = torch.empty(x2.shape[0], A.shape[0], device=x.device, dtype=torch.float32) if save_h else None
        dot, prec = _dot_config(ct)
        _lowrank_linear_fwd(y, x2, A, B, d, float(scale), h, dot, prec, seed, p)
        ctx.save_for_backward(x2, Wc, A, B, d, h, seed)
        ctx.scale, ctx.p, ctx.dot, ctx.prec, ctx.x_shape = float(scale), p, dot, prec, x.shape
        ctx.dtypes = (W.dtype, None if bias is None else bias.dtype)
        return y.view(*x.shape[:-1], -1)  # (..., out)

    @staticmethod
    def backward(ctx, g):
        x2, Wc, A, B, d, h, seed = ctx.saved_tensors
        nx, nW, nbias, nA, nB, nd = ctx.needs_input_grad[:6]
        g2 = _rows(g, g.shape[-1]).to(x2.dtype)  # (N, out)
        dx = torch.mm(g2, Wc) if nx else None  # (N, in) = g W; the kernel adds the low-rank part into it
        dA = dB = dd = None
        if nx or nA or nB or nd:
            _, dA, dB, dd = _lowrank_linear_bwd(g2, x2, A, B, d, h, ctx.scale, (nx, nA, nB, nd), ctx.dot,
                                                ctx.prec, dx=dx, seed=seed, p=ctx.p)
        dW = torch.mm(g2.t(), x2).to(ctx.dtypes[0]) if nW else None  # (out, in)
        dbias = g2.float().sum(0).to(ctx.dtypes[1]) if nbias else None  # (out,)
        return None if dx is None else dx.view(ctx.x_shape), dW, dbias, dA, dB, dd, None, None, None


def lowrank_linear_reference(x, W, bias, A, B, d=None, scale=1.0, dropout=0.0):
    """x W^T + bias + scale * ((dropout(x) A^T) * d) B^T in plain PyTorch (torch's own dropout mask)."""
    xd = F.dropout(x, dropout) if dropout > 0 else x
    h = xd @ A.T  # (..., r)
    if d is not None:
        h = h * d
    return F.linear(x, W, bias) + scale * (h @ B.T)  # (..., out)


def lowrank_linear(x, W, bias, A, B, d=None, scale=1.0, dropout=0.0, seed=None):
    """The whole adapted layer: x W^T + bias + scale * ((dropout(x) A^T) * d) B^T for x (..., in), W (out, in),
    bias (out,) or None, A (r, in), B (out, r), d (r,) or None.

    dropout (LoRA's, on the adapter's input only; pass 0 in eval mode) is drawn inside the kernels from
    `seed`, a (1,) int64 tensor on x's device (drawn from torch's generator when None); `dropout_mask`
    gives the mask a seed draws. Ranks above 128 and empty inputs run the reference."""
    r, d_in = A.shape
    if x.shape[-1] != d_in or tuple(W.shape) != (B.shape[0], d_in) or B.shape[1] != r \
            or (d is not None and tuple(d.shape) != (r,)) or (bias is not None and tuple(bias.shape) != (W.shape[0],)):
        raise ValueError(f"lowrank_linear: shapes x {tuple(x.shape)}, W {tuple(W.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, d {None if d is None else tuple(d.shape)} do not fit "
                         f"x (..., in), W (out, in), A (r, in), B (out, r), d (r,)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lowrank_linear: dropout must be in [0, 1), got {dropout}")
    _check_applies("lowrank_linear", x, W, bias, A, B, d)
    if x.numel() == 0 or r > _MAX_RANK:
        return lowrank_linear_reference(x, W, bias, A, B, d, scale, dropout)
    if dropout > 0 and seed is None:
        seed = torch.randint(2 ** 31 - 1, (1,), device=x.device)  # device RNG: fresh per CUDA-graph replay
    return LowRankLinearFunction.apply(x, W, bias, A, B, d, scale, float(dropout), seed if dropout > 0 else None)


def dropout_mask(seed, n_rows, n_cols, p):
    """The (n_rows, n_cols) bool keep-mask the low-rank kernels draw for seed (a (1,) int64 tensor) and
    dropout p, for an input viewed as (n_rows, n_cols): for tests, and to reproduce a step."""
    _check_applies("dropout_mask", seed.float())
    out = torch.empty(n_rows, n_cols, device=seed.device, dtype=torch.int8)
    block = 1024
    _dropout_mask_kernel[(triton.cdiv(out.numel(), block),)](seed, out, out.numel(), float(p), BLOCK=block)
    return out.bool()


# -----------------------------------------------------------------------------------------------------
# 2. SeRA: out = s * x blockdiag(A) C blockdiag(B)
#
#   A (S, IS, RS), C (R, R), B (S, RS, OS);  S = split, IS = in/S, RS = r/S, OS = out/S, R = r, s = scale.
#   Dense views, never stored: Ad (IN, R) with Ad[k, c] = A[k//IS, k%IS, c%RS] if k//IS == c//RS else 0
#   (A's flat index k*RS + c%RS), and Bd (R, OUT) with Bd[c, o] = B[c//RS, c%RS, o%OS] if c//RS == o//OS
#   (flat index c*OS + o%OS). r is small, so each tile of Ad or Bd is gathered as a masked dense tile in
#   registers: the zeros cost no memory traffic and the chain x -> Ad -> C -> Bd stays one kernel.
# One program per BLOCK_M rows: h1 = x Ad over IN, h2 = s * h1 C in registers, then out = h2 Bd over OUT.

@triton.jit
def _sera_delta_fwd_kernel(
    x_ptr,  # (N, IN) input, unit column stride
    a_ptr,  # (S, IS, RS) contiguous
    c_ptr,  # (R, R) contiguous
    b_ptr,  # (S, RS, OS) contiguous
    out_ptr,  # (N, OUT) contiguous output
    h_ptr,  # (N, R) fp32: h1 = x Ad saved for the backward; written only if SAVE_H
    N, IN, OUT, R, IS, RS, OS,
    stride_xm,
    scale,
    SAVE_H: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rmask, rkmask = rows < N, ranks < R
    h1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < IN
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0)
        am = cmask[:, None] & rkmask[None, :] & (cols[:, None] // IS == ranks[None, :] // RS)
        ad = tl.load(a_ptr + cols[:, None] * RS + (ranks % RS)[None, :], mask=am, other=0.0)  # (BLOCK_K, BLOCK_R)
        h1 = tl.dot(x.to(DOT), ad.to(DOT), h1, input_precision=PREC)
    if SAVE_H:
        tl.store(h_ptr + rows[:, None] * R + ranks[None, :], h1, mask=rmask[:, None] & rkmask[None, :])
    c = tl.load(c_ptr + ranks[:, None] * R + ranks[None, :], mask=rkmask[:, None] & rkmask[None, :], other=0.0)
    h2 = (tl.dot(h1.to(DOT), c.to(DOT), input_precision=PREC) * scale).to(DOT)  # (BLOCK_M, BLOCK_R)
    for n0 in range(0, OUT, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        omask = outs < OUT
        bm = rkmask[:, None] & omask[None, :] & (ranks[:, None] // RS == outs[None, :] // OS)
        bd = tl.load(b_ptr + ranks[:, None] * OS + (outs % OS)[None, :], mask=bm, other=0.0)  # (BLOCK_R, BLOCK_N)
        o = tl.dot(h2, bd.to(DOT), input_precision=PREC)
        tl.store(out_ptr + rows[:, None] * OUT + outs[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & omask[None, :])


# Backward. With g = dL/dout (N, OUT), h1 = x Ad, h2 = h1 C (both (N, R)), out = s h2 Bd:
#   gh2 = s * g Bd^T           (N, R)
#   dBd = s * h2^T g           (R, OUT), kept on the diagonal blocks only -> column pass with U = s*h2
#   dC  = h1^T gh2             (R, R)    -> per-row-block partials here, summed on the host
#   gh1 = gh2 C^T              (N, R)
#   dAd = x^T gh1              (IN, R), diagonal blocks only -> column pass with U = gh1 (gives dAd^T)
#   dx  = gh1 Ad^T             (N, IN)   -> this kernel
@triton.jit
def _sera_delta_bwd_kernel(
    g_ptr,  # (N, OUT) output gradient, unit column stride
    h_ptr,  # (N, R) fp32 h1 saved by the forward
    a_ptr,  # (S, IS, RS) contiguous
    c_ptr,  # (R, R) contiguous
    b_ptr,  # (S, RS, OS) contiguous
    dx_ptr,  # (N, IN) contiguous, written only if NEED_DX
    gh_ptr,  # (N, R) fp32 gh1, written only if NEED_GH
    h2_ptr,  # (N, R) fp32 s * h2, written only if NEED_H2
    dc_ptr,  # (row blocks, R, R) fp32 partial dC, written only if NEED_DC
    N, IN, OUT, R, IS, RS, OS,
    stride_gm,
    scale,
    NEED_DX: tl.constexpr, NEED_GH: tl.constexpr, NEED_H2: tl.constexpr, NEED_DC: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rmask, rkmask = rows < N, ranks < R
    hmask = rmask[:, None] & rkmask[None, :]
    cmask2 = rkmask[:, None] & rkmask[None, :]
    h1 = tl.load(h_ptr + rows[:, None] * R + ranks[None, :], mask=hmask, other=0.0)
    c = tl.load(c_ptr + ranks[:, None] * R + ranks[None, :], mask=cmask2, other=0.0).to(DOT)
    gh2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, OUT, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        omask = outs < OUT
        g = tl.load(g_ptr + rows[:, None] * stride_gm + outs[None, :], mask=rmask[:, None] & omask[None, :],
                    other=0.0)
        bm = omask[:, None] & rkmask[None, :] & (outs[:, None] // OS == ranks[None, :] // RS)
        bdt = tl.load(b_ptr + ranks[None, :] * OS + (outs % OS)[:, None], mask=bm, other=0.0)  # (BLOCK_N, BLOCK_R)
        gh2 = tl.dot(g.to(DOT), bdt.to(DOT), gh2, input_precision=PREC)
    gh2 = gh2 * scale
    if NEED_DC:
        dc = tl.dot(tl.trans(h1).to(DOT), gh2.to(DOT), input_precision=PREC)  # (BLOCK_R, BLOCK_R)
        tl.store(dc_ptr + pid * R * R + ranks[:, None] * R + ranks[None, :], dc, mask=cmask2)
    if NEED_H2:
        h2 = tl.dot(h1.to(DOT), c, input_precision=PREC) * scale
        tl.store(h2_ptr + rows[:, None] * R + ranks[None, :], h2, mask=hmask)
    gh1 = tl.dot(gh2.to(DOT), tl.trans(c), input_precision=PREC)  # (BLOCK_M, BLOCK_R)
    if NEED_GH:
        tl.store(gh_ptr + rows[:, None] * R + ranks[None, :], gh1, mask=hmask)
    if NEED_DX:
        gh1d = gh1.to(DOT)
        for k0 in range(0, IN, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < IN
            am = rkmask[:, None] & cmask[None, :] & (ranks[:, None] // RS == cols[None, :] // IS)
            adt = tl.load(a_ptr + cols[None, :] * RS + (ranks % RS)[:, None], mask=am, other=0.0)  # Ad^T tile
            dx = tl.dot(gh1d, adt.to(DOT), input_precision=PREC)
            tl.store(dx_ptr + rows[:, None] * IN + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=rmask[:, None] & cmask[None, :])


def _sera_sizes(x, A, B):
    N, IN = x.shape
    S, IS, RS = A.shape
    OS = B.shape[2]
    return N, IN, S * OS, S * RS, IS, RS, OS  # N, IN, OUT, R, IS, RS, OS


def _sera_delta_fwd(x, A, C, B, scale, h1, out, dot, prec):
    """out (N, OUT) = scale * x Ad C Bd; h1 (N, R) fp32 receives x Ad when not None."""
    N, IN, OUT, R, IS, RS, OS = _sera_sizes(x, A, B)
    block_r = _rank_block(R)
    bm = _row_block(N, block_r, x)
    _sera_delta_fwd_kernel[(triton.cdiv(N, bm),)](
        x, A, C, B, out, h1 if h1 is not None else x, N, IN, OUT, R, IS, RS, OS, x.stride(0), scale,
        SAVE_H=h1 is not None, DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_N=_block(x), BLOCK_K=_block(x),
        BLOCK_R=block_r, num_warps=4,
    )


def _sera_delta_bwd(g, x, A, C, B, h1, scale, need, dot, prec):
    """Gradients (dx, dA, dC, dB) for the flags in need = (x, A, C, B); None where not needed."""
    need_x, need_A, need_C, need_B = need
    N, IN, OUT, R, IS, RS, OS = _sera_sizes(x, A, B)
    S = A.shape[0]
    block_r = _rank_block(R)
    bm = _row_block(N, block_r, x)
    blocks = triton.cdiv(N, bm)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty(N, IN, device=x.device, dtype=x.dtype) if need_x else None
    gh1 = torch.empty(N, R, **f32) if need_A else None
    h2 = torch.empty(N, R, **f32) if need_B else None
    dc = torch.empty(blocks, R, R, **f32) if need_C else None
    _sera_delta_bwd_kernel[(blocks,)](
        g, h1, A, C, B, dx if need_x else h1, gh1 if need_A else h1, h2 if need_B else h1, dc if need_C else h1,
        N, IN, OUT, R, IS, RS, OS, g.stride(0), scale,
        NEED_DX=need_x, NEED_GH=need_A, NEED_H2=need_B, NEED_DC=need_C,
        DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_N=_block(x), BLOCK_K=_block(x), BLOCK_R=block_r, num_warps=4,
    )
    dA = dB = dC = None
    dad, dbd = _weight_grads(gh1, x, h2, g, dot, prec) if (need_A or need_B) else (None, None)
    if need_A:
        dad = dad.reshape(S, RS, S, IS)  # (R, IN) = Ad-gradient^T, by blocks
        dA = dad.diagonal(dim1=0, dim2=2).permute(2, 1, 0).to(A.dtype)  # (RS, IS, S) -> (S, IS, RS)
    if need_B:
        dbd = dbd.reshape(S, RS, S, OS)  # (R, OUT) = Bd-gradient, by blocks
        dB = dbd.diagonal(dim1=0, dim2=2).permute(2, 0, 1).to(B.dtype)  # (RS, OS, S) -> (S, RS, OS)
    if need_C:
        dC = dc.sum(0).to(C.dtype)  # (R, R)
    return dx, dA, dC, dB


class SeRADeltaFunction(torch.autograd.Function):
    """scale * x blockdiag(A) C blockdiag(B), shape (..., out), in the compute dtype."""

    @staticmethod
    def forward(ctx, x, A, C, B, scale):
        x2 = _rows(x, x.shape[-1])  # (N, in)
        A, C, B = A.contiguous(), C.contiguous(), B.contiguous()
        ct = _compute_dtype(x)
        dot, prec = _dot_config(ct)
        N, _, OUT, R = _sera_sizes(x2, A, B)[:4]
        out = torch.empty(N, OUT, device=x.device, dtype=ct)
        save_h = any(ctx.needs_input_grad[:4])
        h1 = torch.empty(N, R, device=x.device, dtype=torch.float32) if save_h else None
        _sera_delta_fwd(x2, A, C, B, float(scale), h1, out, dot, prec)
        ctx.save_for_backward(x2, A, C, B, h1)
        ctx.scale, ctx.dot, ctx.prec, ctx.x_shape = float(scale), dot, prec, x.shape
        return out.view(*x.shape[:-1], OUT)  # (..., out)

    @staticmethod
    def backward(ctx, g):
        x2, A, C, B, h1 = ctx.saved_tensors
        g2 = _rows(g, g.shape[-1])  # (N, out)
        dx, dA, dC, dB = _sera_delta_bwd(g2, x2, A, C, B, h1, ctx.scale, tuple(ctx.needs_input_grad[:4]),
                                         ctx.dot, ctx.prec)
        dx = dx.view(ctx.x_shape) if dx is not None else None  # (..., in)
        return dx, dA, dC, dB, None


def sera_delta_reference(x, A, C, B, scale):
    """scale * x blockdiag(A) C blockdiag(B) in plain PyTorch, block by block."""
    S, IS, RS = A.shape
    xs = x.reshape(*x.shape[:-1], S, IS)  # (..., split, in/split)
    h = torch.einsum("...si,sij->...sj", xs, A).flatten(-2) @ C  # (..., r)
    hs = h.reshape(*h.shape[:-1], S, RS)  # (..., split, r/split)
    return scale * torch.einsum("...sj,sjo->...so", hs, B).flatten(-2)  # (..., out)


def sera_delta(x, A, C, B, scale):
    """scale * x blockdiag(A) C blockdiag(B) for x (..., in), A (split, in/split, r/split), C (r, r),
    B (split, r/split, out/split); returns (..., out) in the compute dtype (autocast's, else x's)."""
    S, IS, RS = A.shape if A.dim() == 3 else (0, 0, 0)
    if S == 0 or x.shape[-1] != S * IS or tuple(C.shape) != (S * RS, S * RS) or B.dim() != 3 \
            or B.shape[:2] != (S, RS):
        raise ValueError(f"sera_delta: shapes x {tuple(x.shape)}, A {tuple(A.shape)}, C {tuple(C.shape)}, "
                         f"B {tuple(B.shape)} do not fit x (..., in), A (split, in/split, r/split), C (r, r), "
                         f"B (split, r/split, out/split)")
    _check_applies("sera_delta", x, A, C, B)
    if S * RS > _MAX_RANK or x.numel() == 0:
        return sera_delta_reference(x, A, C, B, scale)
    return SeRADeltaFunction.apply(x, A, C, B, scale)


# -----------------------------------------------------------------------------------------------------
# 3. VB-LoRA: the top-k admixture of a shared vector bank
#
#   out[s] = Σ_{i in topk(logits[s])} w_i * bank[idx_i],   w = softmax(the k selected logits)
#
# logits (S, H), bank (H, L): S sub-vectors (all layers' at once), H bank vectors of length L (the paper's
# b), top-k with K a few. The selection runs on the host (torch.topk picks k of <= ~1k values per row
# cheaply); the kernel fuses what would be three passes over (S, K, L): softmax, gather, weighted sum.

_VB_TILE = 4096  # elements of a (rows x L-columns) tile: rows per program = _VB_TILE / BLOCK_L
_VB_BLOCK_E = 32  # bank-gradient entries summed per loop step


@triton.jit
def _vblora_compose_fwd_kernel(
    vals_ptr,  # (S, K) the top-k logits of each row, any float dtype
    idx_ptr,  # (S, K) int64 bank rows they select
    bank_ptr,  # (H, L) vector bank
    out_ptr,  # (S, L) output
    w_ptr,  # (S, K) fp32 softmax weights, saved for backward
    S, L,
    K: tl.constexpr, K_PAD: tl.constexpr,  # k and the next power of two
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_s = tl.program_id(0).to(tl.int64)
    pid_l = tl.program_id(1)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    kcol = tl.arange(0, K_PAD)
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    rmask, kmask, cmask = rows < S, kcol < K, cols < L
    v = tl.load(vals_ptr + rows[:, None] * K + kcol[None, :], mask=rmask[:, None] & kmask[None, :],
                other=float("-inf"))
    v = tl.where(rmask[:, None], v.to(tl.float32), 0.0)  # rows past S: finite dummies, never stored
    e = tl.exp(v - tl.max(v, axis=1)[:, None])
    w = e / tl.sum(e, axis=1)[:, None]  # (BLOCK_S, K_PAD)
    acc = tl.zeros((BLOCK_S, BLOCK_L), dtype=tl.float32)
    for i in tl.static_range(K):
        w_i = tl.sum(tl.where(kcol[None, :] == i, w, 0.0), axis=1)  # column i of w
        idx_i = tl.load(idx_ptr + rows * K + i, mask=rmask, other=0)
        vec = tl.load(bank_ptr + idx_i[:, None] * L + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                      other=0.0)
        acc += w_i[:, None] * vec.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * L + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])
    if pid_l == 0:
        tl.store(w_ptr + rows[:, None] * K + kcol[None, :], w, mask=rmask[:, None] & kmask[None, :])


# Backward, logits part. With g = dL/dout[s] and w = softmax(v) over the k selected logits v:
#   dw_i = g . bank[idx_i]                      (out is linear in w)
#   dv_i = w_i (dw_i - Σ_j w_j dw_j)             (softmax's Jacobian diag(w) - w w^T)
#   dlogits[s, idx_i] = dv_i, zero at the H - K unselected entries (top-k is piecewise constant).
@triton.jit
def _vblora_compose_bwd_kernel(
    g_ptr,  # (S, L) dL/dout
    idx_ptr,  # (S, K) int64 selected bank rows
    w_ptr,  # (S, K) fp32 softmax weights from the forward
    bank_ptr,  # (H, L) vector bank
    dlogits_ptr,  # (S, H) zero-filled; the K selected entries of each row are written
    S, L, H,
    K: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    kcol = tl.arange(0, K_PAD)
    rmask, kmask = rows < S, kcol < K
    idx = tl.load(idx_ptr + rows[:, None] * K + kcol[None, :], mask=rmask[:, None] & kmask[None, :], other=0)
    w = tl.load(w_ptr + rows[:, None] * K + kcol[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    dw = tl.zeros((BLOCK_S, K_PAD), dtype=tl.float32)
    for i in tl.static_range(K):
        idx_i = tl.load(idx_ptr + rows * K + i, mask=rmask, other=0)
        dw_i = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for c0 in range(0, L, BLOCK_L):
            cols = c0 + tl.arange(0, BLOCK_L)
            m2 = rmask[:, None] & (cols < L)[None, :]
            g = tl.load(g_ptr + rows[:, None] * L + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            vec = tl.load(bank_ptr + idx_i[:, None] * L + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            dw_i += tl.sum(g * vec, axis=1)
        dw = tl.where(kcol[None, :] == i, dw_i[:, None], dw)
    dv = w * (dw - tl.sum(w * dw, axis=1)[:, None])  # (BLOCK_S, K_PAD)
    tl.store(dlogits_ptr + rows[:, None] * H + idx, dv.to(dlogits_ptr.dtype.element_ty),
             mask=rmask[:, None] & kmask[None, :])


# Backward, bank part: dbank[h] = Σ over entries (s, i) with idx[s, i] == h of w[s, i] g[s]. A scatter-add
# (several sub-vectors pick the same bank vector), done deterministically: the host sorts the S*K entries
# e = s*K + i by bank row, then one program per bank row sums its entries in that fixed order. A bank row
# picked by many sub-vectors makes its program long; with the paper's random logits picks spread over H.
@triton.jit
def _vblora_compose_bwd_bank_kernel(
    g_ptr,  # (S, L) dL/dout
    w_ptr,  # (S*K,) fp32 softmax weights, flattened
    order_ptr,  # (S*K,) int64 entry ids sorted by bank row
    start_ptr, count_ptr,  # (H,) int64: bank row h owns order[start[h] : start[h] + count[h]]
    dbank_ptr,  # (H, L) output; rows no entry selects get 0
    K, L,
    BLOCK_E: tl.constexpr, BLOCK_L: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    cmask = cols < L
    start = tl.load(start_ptr + h)
    end = start + tl.load(count_ptr + h)
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        pos = e0 + tl.arange(0, BLOCK_E)
        emask = pos < end
        ent = tl.load(order_ptr + pos, mask=emask, other=0)
        w = tl.load(w_ptr + ent, mask=emask, other=0.0)
        g = tl.load(g_ptr + (ent // K)[:, None] * L + cols[None, :], mask=emask[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(w[:, None] * g.to(tl.float32), axis=0)
    tl.store(dbank_ptr + h * L + cols, acc.to(dbank_ptr.dtype.element_ty), mask=cmask)


def _vblora_blocks(k, L):
    """(BLOCK_S, BLOCK_L, K_PAD): L tiles up to 128 wide, rows filling a _VB_TILE-element tile."""
    block_l = min(triton.next_power_of_2(L), 128)
    return _VB_TILE // block_l, block_l, triton.next_power_of_2(k)


def _vblora_compose_fwd(logits, bank, k):
    S, L = logits.shape[0], bank.shape[1]
    vals, idx = torch.topk(logits, k, dim=-1)  # (S, k) each
    idx = idx.contiguous()
    out = torch.empty(S, L, device=bank.device, dtype=torch.promote_types(logits.dtype, bank.dtype))
    w = torch.empty(S, k, device=bank.device, dtype=torch.float32)
    block_s, block_l, k_pad = _vblora_blocks(k, L)
    _vblora_compose_fwd_kernel[(triton.cdiv(S, block_s), triton.cdiv(L, block_l))](
        vals.contiguous(), idx, bank, out, w, S, L, K=k, K_PAD=k_pad, BLOCK_S=block_s, BLOCK_L=block_l)
    return out, idx, w


def _vblora_compose_bwd(g, idx, w, bank, logits_dtype, need_logits, need_bank):
    S, k = idx.shape
    H, L = bank.shape
    block_s, block_l, k_pad = _vblora_blocks(k, L)
    dlogits = dbank = None
    if need_logits:
        dlogits = torch.zeros(S, H, device=g.device, dtype=logits_dtype)
        _vblora_compose_bwd_kernel[(triton.cdiv(S, block_s),)](
            g, idx, w, bank, dlogits, S, L, H, K=k, K_PAD=k_pad, BLOCK_S=block_s, BLOCK_L=block_l)
    if need_bank:
        flat = idx.flatten()  # (S*k,) entry e = s*k + i
        order = torch.argsort(flat, stable=True)  # (S*k,) a fixed summation order per bank row
        # scatter_add_, not bincount: bincount syncs with the host, which CUDA-graph capture forbids
        count = torch.zeros(H, device=flat.device, dtype=flat.dtype).scatter_add_(0, flat, torch.ones_like(flat))
        start = torch.cumsum(count, 0) - count  # (H,)
        dbank = torch.empty_like(bank)
        _vblora_compose_bwd_bank_kernel[(H, triton.cdiv(L, block_l))](
            g, w, order, start, count, dbank, k, L, BLOCK_E=_VB_BLOCK_E, BLOCK_L=block_l)
    return dlogits, dbank


class VBLoRAComposeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bank, k):
        out, idx, w = _vblora_compose_fwd(logits.contiguous(), bank.contiguous(), k)
        ctx.save_for_backward(idx, w, bank)
        ctx.logits_dtype = logits.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        idx, w, bank = ctx.saved_tensors
        dlogits, dbank = _vblora_compose_bwd(g.contiguous(), idx, w, bank.contiguous(), ctx.logits_dtype,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dlogits, dbank, None


def vblora_compose_reference(logits, bank, k):
    """Plain PyTorch: (S, h) logits, (h, b) bank -> (S, b); fp32 maths, result in the promoted dtype."""
    vals, idx = torch.topk(logits, k, dim=-1)  # (S, k)
    w = torch.softmax(vals.float(), dim=-1)  # (S, k)
    out = torch.einsum("sk,skb->sb", w, bank.float()[idx])  # bank[idx]: (S, k, b)
    return out.to(torch.promote_types(logits.dtype, bank.dtype))


def vblora_compose(logits, bank, k):
    """The top-k admixture: logits (S, h), bank (h, b) -> (S, b); gradients to logits and bank."""
    if logits.dim() != 2 or bank.dim() != 2 or logits.shape[1] != bank.shape[0]:
        raise ValueError(f"vblora_compose: need logits (S, h) and bank (h, b), got {tuple(logits.shape)} "
                         f"and {tuple(bank.shape)}")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"vblora_compose: k={k} must be in [1, h={bank.shape[0]}]")
    _check_applies("vblora_compose", logits, bank)
    return VBLoRAComposeFunction.apply(logits, bank, k)


# -----------------------------------------------------------------------------------------------------
# 4. Bone, row grouping: the layer's prologue
#
#   x (N, IN) viewed as (N, IN/b, b) chunks x_j, one B_j (b, b) per input chunk:
#   t_j = x_j B_j^T,   returns  x + t  (N, IN)  and  Σ_j t_j  (N, b)
#
# so the Bone-row layer is y = (x + t) W^T + tile(Σ_j t_j) without forming W' (bone.py). Tiles: BLOCK_M
# rows and, within a chunk, BLOCK_B columns (b padded to a power of two, masked), so any b works and a
# large b loops over tiles instead of holding a b x b tile. Bone's dots run in x's dtype (B cast to it).

@triton.jit
def _bone_tile(pid, BB, BLOCK_B: tl.constexpr):
    # program pid -> (block, p rows, q cols) of a (blocks, BB, BB) tensor, cdiv(BB, BLOCK_B)^2 tiles per block
    nt = tl.cdiv(BB, BLOCK_B)
    p = (pid // nt) % nt * BLOCK_B + tl.arange(0, BLOCK_B)
    q = pid % nt * BLOCK_B + tl.arange(0, BLOCK_B)
    return pid // (nt * nt), p, q


@triton.jit
def _bone_row_fwd_kernel(
    x_ptr,  # (N, IN) input, contiguous
    b_ptr,  # (IN/BB, BB, BB) Bone blocks B_j, contiguous
    y_ptr,  # (N, IN) output x + t
    ts_ptr,  # (N, BB) output Σ_j t_j
    N, IN, NBI, BB,  # rows, in, in/b, b
    DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # output columns within a chunk
    rmask, pmask = rows < N, p < BB
    ts = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for j in range(NBI):
        t = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
        for q0 in range(0, BB, BLOCK_B):
            q = q0 + tl.arange(0, BLOCK_B)
            qmask = q < BB
            x = tl.load(x_ptr + rows[:, None] * IN + j * BB + q[None, :], mask=rmask[:, None] & qmask[None, :],
                        other=0.0)
            bt = tl.load(b_ptr + j * BB * BB + p[None, :] * BB + q[:, None], mask=qmask[:, None] & pmask[None, :],
                         other=0.0)  # (q, p) tile of B_j^T
            t = tl.dot(x.to(DOT), bt.to(DOT), t, input_precision=PREC)
        offs = rows[:, None] * IN + j * BB + p[None, :]
        mask = rmask[:, None] & pmask[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        tl.store(y_ptr + offs, (x.to(tl.float32) + t).to(y_ptr.dtype.element_ty), mask=mask)
        ts += t
    tl.store(ts_ptr + rows[:, None] * BB + p[None, :], ts.to(ts_ptr.dtype.element_ty),
             mask=rmask[:, None] & pmask[None, :])


# Backward. With gx = dL/d(x + t) and gs = dL/d(Σ_j t_j), t_j enters both outputs, so
#   dt_j = gx_j + gs                     (N, b)
#   dx_j = gx_j + dt_j B_j               (identity path + through t_j = x_j B_j^T)   -> this kernel
#   dB_j = dt_j^T x_j                    (b, b), a sum over all N rows               -> the next one
# This kernel: one program per (row block, chunk j, column tile of dx_j).
@triton.jit
def _bone_row_bwd_kernel(
    gx_ptr,  # (N, IN) dL/d(x + t), contiguous
    gs_ptr,  # (N, BB) dL/d(Σ_j t_j), contiguous
    b_ptr,  # (IN/BB, BB, BB) Bone blocks
    dx_ptr,  # (N, IN) output
    N, IN, BB,
    DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(1)
    q = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask, qmask = rows < N, q < BB
    acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for p0 in range(0, BB, BLOCK_B):
        p = p0 + tl.arange(0, BLOCK_B)
        m2 = rmask[:, None] & (p < BB)[None, :]
        gx = tl.load(gx_ptr + rows[:, None] * IN + j * BB + p[None, :], mask=m2, other=0.0)
        gs = tl.load(gs_ptr + rows[:, None] * BB + p[None, :], mask=m2, other=0.0)
        dt = (gx.to(tl.float32) + gs.to(tl.float32)).to(gx_ptr.dtype.element_ty)
        bj = tl.load(b_ptr + j * BB * BB + p[:, None] * BB + q[None, :], mask=(p < BB)[:, None] & qmask[None, :],
                     other=0.0)
        acc = tl.dot(dt.to(DOT), bj.to(DOT), acc, input_precision=PREC)
    offs = rows[:, None] * IN + j * BB + q[None, :]
    mask = rmask[:, None] & qmask[None, :]
    gx = tl.load(gx_ptr + offs, mask=mask, other=0.0)
    tl.store(dx_ptr + offs, (gx.to(tl.float32) + acc).to(dx_ptr.dtype.element_ty), mask=mask)


# dB_j = dt_j^T x_j: program (chunk j, tile (p, q) of dB_j, split s) sums row blocks s, s + SPLIT, ...
# into its own slice of a fp32 partial buffer; the host sums the SPLIT slices (deterministic).
@triton.jit
def _bone_row_bwd_db_kernel(
    gx_ptr, gs_ptr, x_ptr,  # (N, IN), (N, BB), (N, IN), contiguous
    dbp_ptr,  # (SPLIT, IN/BB, BB, BB) fp32 partial sums
    N, IN, NBI, BB, SPLIT,  # rows, in, in/b, b, number of row splits
    DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):
    j, p, q = _bone_tile(tl.program_id(0), BB, BLOCK_B)
    pmask, qmask = p < BB, q < BB
    split = tl.program_id(1)
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    for m0 in range(split * BLOCK_M, N, SPLIT * BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < N
        gx = tl.load(gx_ptr + rows[None, :] * IN + j * BB + p[:, None], mask=pmask[:, None] & rmask[None, :],
                     other=0.0)
        gs = tl.load(gs_ptr + rows[None, :] * BB + p[:, None], mask=pmask[:, None] & rmask[None, :], other=0.0)
        dtT = (gx.to(tl.float32) + gs.to(tl.float32)).to(gx_ptr.dtype.element_ty)  # (BLOCK_B, BLOCK_M)
        x = tl.load(x_ptr + rows[:, None] * IN + j * BB + q[None, :], mask=rmask[:, None] & qmask[None, :],
                    other=0.0)
        acc = tl.dot(dtT.to(DOT), x.to(DOT), acc, input_precision=PREC)
    out = dbp_ptr + split.to(tl.int64) * NBI * BB * BB + j * BB * BB
    tl.store(out + p[:, None] * BB + q[None, :], acc, mask=pmask[:, None] & qmask[None, :])


def _bone_block(b, t):
    """BLOCK_B: b's power of two, between 16 and the column tile width."""
    return max(16, min(_block(t), triton.next_power_of_2(b)))


def _bone_splits(tiles, most):
    """Row (or column-block) splits of a dB reduction: about _SPLIT_TARGET programs, at most `most`."""
    return max(1, min(most, triton.cdiv(_SPLIT_TARGET, tiles)))


def _bone_row_fwd(x, B):
    N, IN = x.shape
    nbi, b = B.shape[0], B.shape[1]
    y = torch.empty_like(x)
    ts = torch.empty(N, b, device=x.device, dtype=x.dtype)
    bm, bb = _block(x), _bone_block(b, x)
    dot, prec = _dot_config(x.dtype)
    _bone_row_fwd_kernel[(triton.cdiv(N, bm), triton.cdiv(b, bb))](
        x, B, y, ts, N, IN, nbi, b, DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_B=bb)
    return y, ts


def _bone_row_bwd(gx, gs, x, B, need_x, need_B):
    N, IN = x.shape
    nbi, b = B.shape[0], B.shape[1]
    bm, bb = _block(x), _bone_block(b, x)
    nt = triton.cdiv(b, bb)
    dot, prec = _dot_config(x.dtype)
    dx = dB = None
    if need_x:
        dx = torch.empty_like(gx)
        _bone_row_bwd_kernel[(triton.cdiv(N, bm), nbi, nt)](
            gx, gs, B, dx, N, IN, b, DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_B=bb)
    if need_B:
        tiles = nbi * nt * nt
        split = _bone_splits(tiles, triton.cdiv(N, bm))
        part = torch.empty(split, nbi, b, b, device=x.device, dtype=torch.float32)
        _bone_row_bwd_db_kernel[(tiles, split)](
            gx, gs, x, part, N, IN, nbi, b, split, DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_B=bb)
        dB = part.sum(0).to(B.dtype)  # (in/b, b, b)
    return dx, dB


class BoneRowFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, B):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (N, in)
        B = B.contiguous()
        y, ts = _bone_row_fwd(x2, B)
        ctx.save_for_backward(x2, B)
        return y.view(x.shape), ts.view(*x.shape[:-1], B.shape[1])  # (..., in), (..., b)

    @staticmethod
    def backward(ctx, gy, gts):
        x2, B = ctx.saved_tensors
        gx = gy.reshape(x2.shape).contiguous()  # (N, in)
        gs = gts.reshape(x2.shape[0], B.shape[1]).contiguous()  # (N, b)
        dx, dB = _bone_row_bwd(gx, gs, x2, B, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (None if dx is None else dx.view(gy.shape)), dB


def bone_row_reference(x, B):
    """Plain PyTorch: x (..., in), B (in/b, b, b) -> (x + t (..., in), Σ_j t_j (..., b))."""
    nbi, b = B.shape[0], B.shape[1]
    xs = x.reshape(*x.shape[:-1], nbi, b)  # (..., in/b, b)
    t = torch.einsum("...jq,jpq->...jp", xs, B)  # (..., in/b, b): t_j = x_j B_j^T
    return (xs + t).reshape(x.shape), t.sum(-2)  # (..., in), (..., b)


def bone_row(x, B):
    """The Bone-row prologue: x (..., in), B (in/b, b, b) -> (x + t, Σ_j t_j); gradients to x and B.
    Computed and returned in x's dtype, autocast's when it is on (an fp32 activation, e.g. from a
    LayerNorm, would otherwise run fp32 dots and hand fp32 on to bf16 layers)."""
    if B.dim() != 3 or B.shape[1] != B.shape[2] or x.shape[-1] != B.shape[0] * B.shape[1]:
        raise ValueError(f"bone_row: need B (in/b, b, b) with in = {x.shape[-1]}, got {tuple(B.shape)}")
    _check_applies("bone_row", x, B)
    return BoneRowFunction.apply(x.to(_compute_dtype(x)), B)


# -----------------------------------------------------------------------------------------------------
# 5. Bone, col grouping: the whole layer
#
#   y = x W'^T + bias,   W'_ij = W_ij + W_ij B_i + B_i   (b x b blocks: i over out/b, j over in/b)
#   W'_ij[p, q] = W_ij[p, q] + Σ_r W_ij[p, r] B_i[r, q] + B_i[p, q]
#
# W' has no factorisation through x. Design: a Triton matmul that formed each W' tile in registers ran at a
# fraction of cuBLAS's rate on the same products (the W' tile costs extra flops per row block and its
# registers spill; measured on an H100: docs/kernels.md). So the three big products (x W'^T, g W', g^T x)
# stay with cuBLAS and the kernels do the memory-bound parts around them, one pass each: the forward kernel
# forms W' from W (any dtype) and B, written once in the compute dtype (the copy autocast would make of W
# anyway; torch needs five passes for it); the backward kernel reduces dB from G = dW' = g^T x. W' and G
# are transient (one layer's worth); only x, W and B are saved for backward.

@triton.jit
def _bone_col_wprime_tile(w_ptr, b_ptr, i, j, p, q, IN, BB,
                          DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr):
    # fp32 tile W'_ij[p, q] (p, q: index vectors within the b x b block); the W_ij B_i product runs in DOT,
    # W's own dtype or the output's if narrower (W B is a small correction to W: bf16 operands cost it less
    # than the bf16 rounding of W' itself)
    pmask, qmask = p < BB, q < BB
    wrow = (i * BB + p).to(tl.int64) * IN + j * BB  # (BLOCK_B,) start of each W row inside block ij
    bi = b_ptr + i * BB * BB  # B holds out*b elements: int32 offsets are enough
    w = tl.load(w_ptr + wrow[:, None] + q[None, :], mask=pmask[:, None] & qmask[None, :], other=0.0)
    wb = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    for r0 in range(0, BB, BLOCK_B):
        r = r0 + tl.arange(0, BLOCK_B)
        rkmask = r < BB
        wr = tl.load(w_ptr + wrow[:, None] + r[None, :], mask=pmask[:, None] & rkmask[None, :], other=0.0)
        br = tl.load(bi + r[:, None] * BB + q[None, :], mask=rkmask[:, None] & qmask[None, :], other=0.0)
        wb = tl.dot(wr.to(DOT), br.to(DOT), wb, input_precision=PREC)
    bpq = tl.load(bi + p[:, None] * BB + q[None, :], mask=pmask[:, None] & qmask[None, :], other=0.0)
    return w.to(tl.float32) + wb + bpq.to(tl.float32)


# Forward: one program per (row block i, p-tile) x column block j; it writes W'_ij's rows p, all q.
@triton.jit
def _bone_col_linear_fwd_kernel(
    w_ptr,  # (OUT, IN) frozen weight, contiguous
    b_ptr,  # (OUT/BB, BB, BB) Bone blocks B_i, contiguous
    wp_ptr,  # (OUT, IN) output W' in the compute dtype
    IN, BB,
    DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr,
):
    nt = tl.cdiv(BB, BLOCK_B)
    i = tl.program_id(0).to(tl.int64) // nt
    p = tl.program_id(0) % nt * BLOCK_B + tl.arange(0, BLOCK_B)
    j = tl.program_id(1).to(tl.int64)
    pmask = p < BB
    for q0 in range(0, BB, BLOCK_B):
        q = q0 + tl.arange(0, BLOCK_B)
        wp = _bone_col_wprime_tile(w_ptr, b_ptr, i, j, p, q, IN, BB, DOT, PREC, BLOCK_B)  # (p, q) fp32
        out = wp_ptr + (i * BB + p).to(tl.int64)[:, None] * IN + j * BB + q[None, :]
        tl.store(out, wp.to(wp_ptr.dtype.element_ty), mask=pmask[:, None] & (q < BB)[None, :])


# Backward. With g = dL/dy (N, OUT), G = dL/dW' = g^T x (OUT, IN) and its b x b blocks G_ij:
#   dx    = g W'                                    (cuBLAS, W' formed again by the forward kernel)
#   G     = g^T x                                   (cuBLAS)
#   dB_i  = Σ_j (W_ij^T G_ij + G_ij) = Σ_j (W_ij + I)^T G_ij     (this kernel)
#           (W'_ij is affine in B_i: d tr(G^T W B)/dB = W^T G, and the + B_i term gives G)
#   dbias = Σ_rows g
# Program (i, tile (p, q), split s) sums j = s, s + SPLIT, ... into its fp32 dB tile; the host adds the
# SPLIT slices (a fixed order: deterministic, no atomics).
@triton.jit
def _bone_col_linear_bwd_kernel(
    g_ptr, w_ptr,  # (OUT, IN) G = dW' and the frozen weight, contiguous
    dbp_ptr,  # (SPLIT, OUT/BB, BB, BB) fp32 partial sums
    IN, NBO, NBI, BB, SPLIT,  # in, out/b, in/b, b, number of j splits
    DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr,
):
    i, p, q = _bone_tile(tl.program_id(0), BB, BLOCK_B)
    pmask, qmask = p < BB, q < BB
    split = tl.program_id(1)
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    for j in range(split, NBI, SPLIT):
        for r0 in range(0, BB, BLOCK_B):
            r = r0 + tl.arange(0, BLOCK_B)
            rkmask = r < BB
            row = (i * BB + r).to(tl.int64) * IN + j * BB  # (BLOCK_B,) start of row r of block ij
            g = tl.load(g_ptr + row[:, None] + q[None, :], mask=rkmask[:, None] & qmask[None, :], other=0.0)
            wT = tl.load(w_ptr + row[None, :] + p[:, None], mask=pmask[:, None] & rkmask[None, :],
                         other=0.0)  # W_ij[r, p] as (p, r)
            eye = tl.where(p[:, None] == r[None, :], 1.0, 0.0)  # (p, r): the + I, kept apart from W
            # both products in G's dtype, fp32 sums: 1 + W_pp in bf16 would round W_pp away, I alone is exact
            acc = tl.dot(wT.to(DOT), g.to(DOT), acc, input_precision=PREC)
            acc = tl.dot(eye.to(DOT), g.to(DOT), acc, input_precision=PREC)
    out = dbp_ptr + split.to(tl.int64) * NBO * BB * BB + i.to(tl.int64) * BB * BB
    tl.store(out + p[:, None] * BB + q[None, :], acc, mask=pmask[:, None] & qmask[None, :])


def _bone_col_linear_fwd(W, B, dtype):
    """W' (out, in) in `dtype`, formed from W and B in one pass."""
    OUT, IN = W.shape
    b = B.shape[1]
    bb = _bone_block(b, W)
    dot, prec = _dot_config(dtype if dtype.itemsize < W.dtype.itemsize else W.dtype)
    Wp = torch.empty(OUT, IN, device=W.device, dtype=dtype)
    _bone_col_linear_fwd_kernel[((OUT // b) * triton.cdiv(b, bb), IN // b)](
        W, B, Wp, IN, b, DOT=dot, PREC=prec, BLOCK_B=bb)
    return Wp


def _bone_col_linear_bwd(G, W, B):
    """dB (out/b, b, b) in B's dtype from G = dL/dW' (out, in)."""
    OUT, IN = W.shape
    b = B.shape[1]
    nbo, nbi = OUT // b, IN // b
    bb = _bone_block(b, W)
    tiles = nbo * triton.cdiv(b, bb) ** 2
    split = _bone_splits(tiles, nbi)
    part = torch.empty(split, nbo, b, b, device=W.device, dtype=torch.float32)
    dot, prec = _dot_config(G.dtype)
    _bone_col_linear_bwd_kernel[(tiles, split)](G, W, part, IN, nbo, nbi, b, split, DOT=dot, PREC=prec, BLOCK_B=bb)
    return part.sum(0).to(B.dtype)  # (out/b, b, b)


class BoneColLinearFunction(torch.autograd.Function):
    """y = x W'^T + bias: W' formed by the forward kernel, the products by cuBLAS (see above)."""

    @staticmethod
    def forward(ctx, x, W, B, bias):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in), in the compute dtype (see bone_col_linear)
        W, B = W.contiguous(), B.contiguous()
        y = F.linear(x2, _bone_col_linear_fwd(W, B, x.dtype), None if bias is None else bias.to(x.dtype))  # (N, out)
        ctx.save_for_backward(x2, W, B)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], W.shape[0])  # (..., out)

    @staticmethod
    def backward(ctx, gy):
        x2, W, B = ctx.saved_tensors
        g = gy.reshape(-1, W.shape[0]).to(x2.dtype)  # (N, out)
        dx = dB = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, _bone_col_linear_fwd(W, B, x2.dtype)).view(*gy.shape[:-1], x2.shape[1])  # (..., in)
        if ctx.needs_input_grad[2]:
            dB = _bone_col_linear_bwd(torch.mm(g.t(), x2), W, B)  # G = g^T x: (out, in)
        if ctx.needs_input_grad[3]:
            dbias = g.float().sum(0).to(ctx.bias_dtype)  # (out,)
        return dx, None, dB, dbias


def bone_col_linear_reference(x, W, B, bias=None):
    """Plain PyTorch: materialises W' (out, in), for tests and benchmarks."""
    nbo, b = B.shape[0], B.shape[1]
    Wb = W.reshape(nbo, b, -1, b)  # (out/b, b, in/b, b): W_ij[p, q] = Wb[i, p, j, q]
    WB = torch.einsum("ipjr,irq->ipjq", Wb, B)  # (out/b, b, in/b, b): W_ij B_i
    Wp = (Wb + WB + B[:, :, None, :]).reshape(W.shape)  # (out, in)
    return F.linear(x, Wp, bias)


def bone_col_linear(x, W, B, bias=None):
    """Bone-col linear: x (..., in), frozen W (out, in), B (out/b, b, b) -> x W'^T + bias. Computed in x's
    dtype (autocast's when it is on), like nn.Linear; W' and dW' are transient, never saved."""
    OUT, IN = W.shape
    if B.dim() != 3 or B.shape[1] != B.shape[2] or B.shape[0] * B.shape[1] != OUT or IN % B.shape[1]:
        raise ValueError(f"bone_col_linear: need B (out/b, b, b) with b | in, b | out for W {tuple(W.shape)}, "
                         f"got {tuple(B.shape)}")
    if x.shape[-1] != IN:
        raise ValueError(f"bone_col_linear: x has {x.shape[-1]} features, W expects in={IN}")
    if W.requires_grad and torch.is_grad_enabled():
        raise ValueError("bone_col_linear: W must be frozen (requires_grad=False); its gradient is not computed")
    _check_applies("bone_col_linear", x, W, B, bias)
    return BoneColLinearFunction.apply(x.to(_compute_dtype(x)), W, B, bias)


# -----------------------------------------------------------------------------------------------------
# A good neighbour to Hugging Face's `kernels` package
#
# Hugging Face ships a package called `kernels`, and transformers (5.25 and newer) requires and imports it.
# Run from this folder, Python finds this file first under that name, so `from kernels import get_kernel`
# would fail inside transformers. When their package is installed (and is not this file), this module
# answers for it too:
# - `__path__` points at their folder, so their submodules (`kernels._internals...`, the compiled
#   `kernels._rust`) import from there;
# - a name this file does not define is looked up in their package: on the first such lookup their
#   `__init__.py` runs once, in a namespace of its own, so it never replaces a name of ours.
# The method files see only what is above (they check NANOPEFT_KERNELS). Without their package nothing
# here runs; where theirs was imported first, the method files fall back to their formulas.


def _their_init():
    """The path of Hugging Face's kernels/__init__.py when that distribution is installed, else None."""
    import importlib.metadata
    try:
        init = os.path.abspath(str(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")))
    except importlib.metadata.PackageNotFoundError:
        return None
    mine = os.path.dirname(os.path.abspath(__file__))
    return init if os.path.isfile(init) and os.path.dirname(init) != mine else None


_THEIR_INIT = _their_init()
_theirs = None  # their package's names, once loaded

if _THEIR_INIT is not None:
    __path__ = [os.path.dirname(_THEIR_INIT)]

    def __getattr__(name):
        global _theirs
        if name.startswith("__") and name not in ("__version__", "__all__"):  # tools probing a module's dunders
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        if _theirs is None:
            ns = {"__name__": __name__, "__package__": __name__, "__path__": __path__, "__file__": _THEIR_INIT}
            _theirs = ns  # set first: their own submodules import names from `kernels` while it runs
            try:
                with open(_THEIR_INIT) as f:
                    exec(compile(f.read(), _THEIR_INIT, "exec"), ns)
            except BaseException:
                _theirs = None  # a failed load is retried (and fails again) rather than half-kept
                raise
        if name in _theirs:
            return _theirs[name]
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (neither this kernels.py nor "
                             f"Hugging Face's kernels package defines it)")
