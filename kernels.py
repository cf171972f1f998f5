"""Hand-written Triton kernels for the adapters, with autograd wrappers, PyTorch references and a benchmark.

Each op has the same four parts, in this order: `_<op>_fwd_kernel`, `_<op>_bwd_kernel` (the gradient maths
written above it), host launchers, `<Op>Function(torch.autograd.Function)`; then `<op>_reference`, the plain
PyTorch formula the tests compare against, and the public function the method files call.

    enabled(*tensors)                      may the Triton path run on these tensors (now)?
    lowrank_add(y, x, A, B, d, scale)      y + scale * ((x A^T) * d) B^T     LoRA, SiVA, VB-LoRA
    lowrank_linear(x, W, bias, A, B, d, s, dropout)  the same with the base layer y = x W^T + bias (cuBLAS)
                                           in one op, and LoRA's dropout on x drawn inside the kernels
    dropout_mask(seed, rows, cols, p)      the keep-mask those kernels draw for a seed
    sera_delta(x, A, C, B, scale)          scale * x blockdiag(A) C blockdiag(B)       SeRA
    vblora_compose(logits, bank, k)        Σ_topk softmax(topk logits) * bank[idx]    VB-LoRA (all layers at once)
    bone_row(x, B)                         (x + t, Σ_j t_j),  t_j = x_j B_j^T          Bone-row prologue
    bone_col_linear(x, W, B, bias)         x W'^T + bias,  W'_ij = W_ij + W_ij B_i + B_i (W' transient)  Bone-col

Choices (the papers say nothing about kernels):
- Low-rank path fused: one program per BLOCK_M rows computes h = x A^T over `in`, keeps it in registers,
  scales by d and adds h B^T into y tile by tile, in place. The (N, r) intermediate never goes to memory
  except as the fp32 copy of h the backward needs (saved only when a gradient is needed).
- Backward in two passes, both deterministic (no atomics): a row pass (`_<op>_bwd_kernel`, one program per
  row block) forms the small per-row quantities (g B, dx, the (N, r) factors of the weight gradients, a
  per-block partial of the r- or r x r-sized gradients); a column pass (`_weight_grad_kernel`, both of a
  layer's products in one launch) reduces U^T V over the rows for the (r, in) / (r, out) weight gradients,
  split along N into a few fixed chunks whose fp32 partials torch sums. Row-block partials cost r (or r^2)
  floats per block and keep the result bit-reproducible run to run.
- lowrank_linear keeps the base product in cuBLAS and adds the low-rank dx into cuBLAS's g W in place: one
  (N, in) gradient buffer instead of two and their sum.
- Launch overhead: from Python a Triton launch costs 16-50 us of host time (measured on the H100 machine's
  host), a torch op 10-20 us. On a fast GPU that can exceed an adapted layer's GPU work, so an eager
  training step at GPT-2-Medium size is host-bound; CUDA graphs remove it (the benchmark shows both).
- tl.dot needs every dimension >= 16: the rank is padded to a power of two >= 16 with masked loads.
- Dtypes: tensors are loaded in their own dtype (so fp32 adapter parameters can meet bf16 activations);
  dot operands are cast to the compute dtype (the autocast dtype when autocast is on, else x's dtype);
  accumulation is fp32. fp32 dots follow torch's TF32 switch (IEEE by default) so fp32 results match
  torch.matmul. Under TRITON_INTERPRET=1 the operands are cast to fp32: the interpreter's bf16/fp16
  tl.dot returns garbage (triton 3.9).
- Rank above 128: h no longer fits in registers next to the tiles; such calls take the reference path
  (two cuBLAS GEMMs are the right tool there).
- SeRA's blockdiag(A) is gathered tile by tile as a masked dense (BLOCK_K, r) tile in registers (entry
  (k, c) is A[k // (in/split), k % (in/split), c % (r/split)] if the blocks agree, else 0): r is small, so
  the zeros cost no memory traffic and the whole chain x -> A -> C -> B stays one kernel.
- Block sizes: a heuristic picks the row block so the grid covers the GPU's SMs; only the low-rank
  forward (the hot path of three methods) is autotuned on CUDA, over tile widths and pipelining, keyed on
  (in, out, rank block, row block) and not on N, so a new batch length does not re-tune. The
  interpreter uses fixed small tiles so tests are fast and still cross tile borders.
- int64 offsets: program ids are cast to int64 before they multiply a row stride.

`python kernels.py [--device cuda|cpu] [--quick]` prints (1) each op against its reference and (2) one
training step per method against the frozen base model (see `_bench_steps`).
"""
import argparse
import contextlib
import functools
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def enabled(*tensors):
    """True iff the Triton path may run on these tensors: triton imported, NANOPEFT_NO_TRITON != "1" (read
    now, so tests can flip it), every tensor fp32/bf16/fp16 and on CUDA (or on the CPU under
    TRITON_INTERPRET=1). None entries (an absent optional tensor) are ignored."""
    if triton is None or os.environ.get("NANOPEFT_NO_TRITON") == "1":
        return False
    interpret = _interpreting()
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if not (t.is_cuda or (interpret and t.device.type == "cpu")):
            return False
    return True



applies = enabled  # the name the method files call

# -----------------------------------------------------------------------------------------------------
# Shared host helpers and the column-pass kernel used by both ops' backward

_MAX_RANK = 128  # above this h does not fit in registers beside the tiles: reference path instead
_INTERP_BLOCK = 32  # rows / columns per tile under the interpreter: small shapes still span several tiles


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _compute_dtype(x):
    """dtype the products run in: autocast's when it is on for x's device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} \
    if triton is not None else {}


def _dot_config(dtype):
    """(DOT, PREC) constexprs for tl.dot: operand dtype and fp32 input precision."""
    if _interpreting():
        return tl.float32, "ieee"
    if dtype == torch.float32:
        return tl.float32, ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
    return _TL_DTYPE[dtype], "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _rank_block(r):
    return max(16, triton.next_power_of_2(r))


def _row_block(N, block_r, device):
    """Rows per program: the largest of 64/32 that still gives every SM a program (and keeps the
    (rows, rank) fp32 tiles small), else 16."""
    if _interpreting() or device.type != "cuda":
        return _INTERP_BLOCK
    sms = _sm_count(device.index)
    for bm in (64, 32):
        if bm * block_r <= 4096 and triton.cdiv(N, bm) >= sms:
            return bm
    return 16


if triton is not None:

    # LoRA's dropout, drawn inside the kernels as in the Triton tutorial "Low-Memory Dropout": element e of
    # x (flat offset row * in + col, int64) is kept iff tl.rand(seed, e) >= p, and kept values are scaled
    # by 1 / (1 - p). The mask is a pure function of (seed, offset), so the forward and both backward
    # kernels regenerate it where they read x: no (N, in) mask or dropped-out copy of x is ever stored.
    # The seed is a 1-element device tensor drawn from torch's generator at each forward, so CUDA-graph
    # replays draw fresh masks.
    @triton.jit
    def _dropout(x, seed, offsets, p):
        keep = tl.rand(seed, offsets) >= p
        return tl.where(keep, x.to(tl.float32) * (1.0 / (1.0 - p)), 0.0)

    @triton.jit
    def _dropout_mask_kernel(seed_ptr, out_ptr, numel, p, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = tl.rand(tl.load(seed_ptr), offs) >= p
        tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < numel)

    # W = U^T V summed over rows: the (r, M) weight gradients dA = gh^T x, dB^T = hd^T g (and SeRA's block
    # versions). Both of a layer's products go in one launch (Python's launch overhead is per launch):
    # grid (column tiles of problem 1, then of problem 2; row splits); each program reduces its split's
    # rows into a fp32 partial W[split] of one (R, M1 + M2) buffer; the host sums the few partials, so the
    # result does not depend on scheduling.
    @triton.jit
    def _weight_grad_tile(u_ptr, v_ptr, w_ptr, pid_n, pid_s, N, M, R, stride_v, stride_w, rows_per_split,
                          seed, p_drop, DROPOUT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ranks = tl.arange(0, BLOCK_R)
        cmask, kmask = cols < M, ranks < R
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        start = pid_s * rows_per_split
        for m0 in range(0, rows_per_split, BLOCK_M):
            rows = start + m0 + tl.arange(0, BLOCK_M)
            rmask = rows < N
            u = tl.load(u_ptr + rows[:, None] * R + ranks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            v = tl.load(v_ptr + rows[:, None] * stride_v + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0)
            if DROPOUT:  # v is x: the same mask the forward drew (element offsets row * M + col, M = in)
                v = _dropout(v, seed, rows[:, None] * M + cols[None, :], p_drop)
            acc = tl.dot(tl.trans(u).to(DOT), v.to(DOT), acc, input_precision=PREC)
        tl.store(w_ptr + ranks[:, None] * stride_w + cols[None, :], acc, mask=kmask[:, None] & cmask[None, :])

    @triton.jit
    def _weight_grad_kernel(
        u1_ptr, v1_ptr,  # problem 1: (N, R) fp32 row factors, contiguous; (N, M1), unit column stride
        u2_ptr, v2_ptr,  # problem 2: the same with M2 columns (M2 = 0: no problem 2)
        w_ptr,  # (SPLITS, R*M1 + R*M2) fp32 partial sums: per split, (R, M1) then (R, M2), each row-major
        N, M1, M2, R,
        stride_v1, stride_v2,  # row strides of v1, v2
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
            _weight_grad_tile(u1_ptr, v1_ptr, w, pid_n, pid_s, N, M1, R, stride_v1, M1, rows_per_split,
                              seed, p_drop, DROPOUT1, DOT, PREC, BLOCK_M, BLOCK_N, BLOCK_R)
        else:
            _weight_grad_tile(u2_ptr, v2_ptr, w + R * M1, pid_n - tiles1, pid_s, N, M2, R, stride_v2, M2,
                              rows_per_split, seed, p_drop, False, DOT, PREC, BLOCK_M, BLOCK_N, BLOCK_R)


def _weight_grads(u1, v1, u2, v2, dot, prec, seed=None, p=0.0):
    """(u1^T v1, u2^T v2), each (R, M) fp32, in one launch; u (N, R) fp32 contiguous, v (N, M) with unit
    column stride. A pair passed as None gives None. With a seed, v1 is x under LoRA's dropout p."""
    first = u1 if u1 is not None else u2
    N, R = first.shape
    M1 = v1.shape[1] if u1 is not None else 0
    M2 = v2.shape[1] if u2 is not None else 0
    block_r = _rank_block(R)
    if _interpreting() or not first.is_cuda:
        bm, bn, target = _INTERP_BLOCK, _INTERP_BLOCK, 4
    else:
        bm, bn, target = 64, 64, 2 * _sm_count(first.device.index)
    col_tiles, row_blocks = triton.cdiv(M1, bn) + triton.cdiv(M2, bn), triton.cdiv(N, bm)
    splits = min(row_blocks, max(1, target // col_tiles))  # enough programs to fill the GPU, no more
    rows_per_split = triton.cdiv(row_blocks, splits) * bm
    splits = triton.cdiv(N, rows_per_split)
    w = torch.empty(splits, R * (M1 + M2), device=first.device, dtype=torch.float32)
    _weight_grad_kernel[(col_tiles, splits)](
        u1 if u1 is not None else u2, v1 if u1 is not None else v2, u2 if u2 is not None else u1,
        v2 if u2 is not None else v1, w, N, M1, M2, R,
        (v1 if u1 is not None else v2).stride(0), (v2 if u2 is not None else v1).stride(0), rows_per_split,
        seed if seed is not None else w, float(p), DROPOUT1=seed is not None and u1 is not None,
        DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=block_r, num_warps=4,
    )
    w1, w2 = w.sum(0).split([R * M1, R * M2])  # (R*M1,), (R*M2,)
    return (w1.view(R, M1) if u1 is not None else None), (w2.view(R, M2) if u2 is not None else None)


def _rows(t, n):
    """t viewed as (rows, n) with unit column stride (copies only if it has to)."""
    t = t.reshape(-1, n)  # (N, n)
    return t if t.stride(1) == 1 else t.contiguous()


# -----------------------------------------------------------------------------------------------------
# Low-rank path: y += scale * ((x A^T) * d) B^T   (LoRA: d = None; SiVA: A = V_k^T, B = U_k, d = s)

if triton is not None:

    @triton.jit
    def _lowrank_fwd_kernel(
        x_ptr,  # (N, IN) input, unit column stride
        a_ptr,  # (R, IN) down projection
        b_ptr,  # (OUT, R) up projection
        d_ptr,  # (R,) per-rank scale; read only if HAS_D
        y_ptr,  # (N, OUT) base output, updated in place, unit column stride
        h_ptr,  # (N, R) fp32: h = x A^T saved for the backward; written only if SAVE_H
        seed_ptr,  # (1,) int64 dropout seed; read only if DROPOUT
        N, IN, OUT, R,
        stride_x, stride_y, stride_a0, stride_a1, stride_b0, stride_b1,
        scale, p_drop,
        HAS_D: tl.constexpr, SAVE_H: tl.constexpr, DROPOUT: tl.constexpr,  # DROPOUT: x -> dropout(x, p_drop)
        DOT: tl.constexpr, PREC: tl.constexpr,  # dot operand dtype, fp32 input precision
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        ranks = tl.arange(0, BLOCK_R)
        rmask, kmask = rows < N, ranks < R
        if DROPOUT:
            seed = tl.load(seed_ptr)
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < IN
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0)
            if DROPOUT:
                x = _dropout(x, seed, rows[:, None] * IN + cols[None, :], p_drop)
            at = tl.load(a_ptr + ranks[None, :] * stride_a0 + cols[:, None] * stride_a1,
                         mask=cmask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_K, BLOCK_R) = A^T tile
            h = tl.dot(x.to(DOT), at.to(DOT), h, input_precision=PREC)
        if SAVE_H:
            tl.store(h_ptr + rows[:, None] * R + ranks[None, :], h, mask=rmask[:, None] & kmask[None, :])
        if HAS_D:
            h = h * tl.load(d_ptr + ranks, mask=kmask, other=0.0).to(tl.float32)[None, :]
        hs = (h * scale).to(DOT)
        for n0 in range(0, OUT, BLOCK_N):
            outs = n0 + tl.arange(0, BLOCK_N)
            omask = outs < OUT
            bt = tl.load(b_ptr + outs[None, :] * stride_b0 + ranks[:, None] * stride_b1,
                         mask=kmask[:, None] & omask[None, :], other=0.0)  # (BLOCK_R, BLOCK_N) = B^T tile
            yp = y_ptr + rows[:, None] * stride_y + outs[None, :]
            ym = rmask[:, None] & omask[None, :]
            acc = tl.load(yp, mask=ym, other=0.0).to(tl.float32)
            acc = tl.dot(hs, bt.to(DOT), acc, input_precision=PREC)
            tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=ym)

    # CUDA only: tile widths and pipelining (BLOCK_M comes from the heuristic, so the grid is known)
    _lowrank_fwd_tuned = triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3),
                                 (128, 128, 4, 4), (256, 64, 8, 3)]
        ],
        key=["IN", "OUT", "BLOCK_R", "BLOCK_M"],
        restore_value=["y_ptr"],  # the kernel adds into y: every trial must start from the same y
    )(_lowrank_fwd_kernel)

    # Backward. With g = dL/dy (N, OUT), h = x A^T (N, R), s = scale:
    #   y_out = y + s * (h * d) B^T          so   dL/dy   = g
    #   gB = g B                   (N, R)
    #   dB = s * g^T (h * d)       (OUT, R)  = (hd^T g)^T with hd = s * h * d   -> column pass
    #   gh = s * gB * d            (N, R)    gradient reaching h
    #   dx = gh A                  (N, IN)   -> this kernel
    #   dA = gh^T x                (R, IN)   -> column pass
    #   dd = s * sum_rows h * gB   (R,)      -> per-row-block partials here, summed on the host
    # One program per BLOCK_M rows: loop over OUT for gB, then over IN for dx; stores gh and hd (N, R) fp32
    # for the column pass. With LoRA's dropout, x above is x~ = m * x / (1 - p) (mask m regenerated from
    # the seed): dx = (gh A) * m / (1 - p) and dA = gh^T x~; h was computed from x~, so dB and dd need nothing.
    @triton.jit
    def _lowrank_bwd_kernel(
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
        stride_g, stride_a0, stride_a1, stride_b0, stride_b1,
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
        rmask, kmask = rows < N, ranks < R
        hmask = rmask[:, None] & kmask[None, :]
        h = tl.load(h_ptr + rows[:, None] * R + ranks[None, :], mask=hmask, other=0.0)
        gb = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, OUT, BLOCK_N):
            outs = n0 + tl.arange(0, BLOCK_N)
            omask = outs < OUT
            g = tl.load(g_ptr + rows[:, None] * stride_g + outs[None, :], mask=rmask[:, None] & omask[None, :],
                        other=0.0)
            b = tl.load(b_ptr + outs[:, None] * stride_b0 + ranks[None, :] * stride_b1,
                        mask=omask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_N, BLOCK_R)
            gb = tl.dot(g.to(DOT), b.to(DOT), gb, input_precision=PREC)
        gb = gb * scale
        if HAS_D:
            d = tl.load(d_ptr + ranks, mask=kmask, other=0.0).to(tl.float32)
            gh = gb * d[None, :]
            hd = h * d[None, :] * scale
            if NEED_DD:
                tl.store(dd_ptr + pid * R + ranks, tl.sum(h * gb, axis=0), mask=kmask)
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
                a = tl.load(a_ptr + ranks[:, None] * stride_a0 + cols[None, :] * stride_a1,
                            mask=kmask[:, None] & cmask[None, :], other=0.0)  # (BLOCK_R, BLOCK_K)
                dxp = dx_ptr + rows[:, None] * IN + cols[None, :]
                dmask = rmask[:, None] & cmask[None, :]
                dx = tl.dot(ghd, a.to(DOT), input_precision=PREC)
                if DROPOUT:
                    dx = _dropout(dx, seed, rows[:, None] * IN + cols[None, :], p_drop)
                if ACC_DX:
                    dx += tl.load(dxp, mask=dmask, other=0.0).to(tl.float32)
                tl.store(dxp, dx.to(dx_ptr.dtype.element_ty), mask=dmask)


def _lowrank_fwd(y, x, A, B, d, scale, h, dot, prec, seed=None, p=0.0):
    """y (N, OUT) += scale * ((x A^T) * d) B^T in place; h (N, R) fp32 receives x A^T when not None. With a
    seed, x is dropped out with probability p inside the kernel."""
    N, IN = x.shape
    OUT, R = B.shape
    block_r = _rank_block(R)
    bm = _row_block(N, block_r, x.device)
    args = (x, A, B, d if d is not None else A, y, h if h is not None else x, seed if seed is not None else x,
            N, IN, OUT, R, x.stride(0), y.stride(0), A.stride(0), A.stride(1), B.stride(0), B.stride(1),
            scale, float(p))
    meta = dict(HAS_D=d is not None, SAVE_H=h is not None, DROPOUT=seed is not None, DOT=dot, PREC=prec,
                BLOCK_M=bm, BLOCK_R=block_r)
    grid = (triton.cdiv(N, bm),)
    if _interpreting() or not x.is_cuda:
        _lowrank_fwd_kernel[grid](*args, **meta, BLOCK_N=_INTERP_BLOCK, BLOCK_K=_INTERP_BLOCK)
        return
    # the autotuner's own dispatch costs ~26 us of Python per call (measured on an H100 host: 49.7 us
    # through it, 23.8 us launching the kernel directly), so it runs once per case and we keep its pick
    key = (IN, OUT, block_r, bm, x.dtype, y.dtype, A.dtype, B.dtype, None if d is None else d.dtype,
           h is not None, seed is not None, dot, prec)
    config = _LOWRANK_FWD_CONFIG.get(key)
    if config is not None:
        _lowrank_fwd_kernel[grid](*args, **meta, **config.all_kwargs())
    else:
        _lowrank_fwd_tuned[grid](*args, **meta)
        if getattr(_lowrank_fwd_tuned, "best_config", None) is not None:
            _LOWRANK_FWD_CONFIG[key] = _lowrank_fwd_tuned.best_config


_LOWRANK_FWD_CONFIG = {}  # case -> the autotuner's chosen triton.Config


def _lowrank_bwd(g, x, A, B, d, h, scale, need, dot, prec, dx=None, seed=None, p=0.0):
    """Gradients (dx, dA, dB, dd) for the flags in need = (x, A, B, d); None where not needed. A given dx
    (N, IN) contiguous receives the low-rank part of the input gradient added in place."""
    need_x, need_A, need_B, need_d = need
    N, IN = x.shape
    OUT, R = B.shape
    block_r = _rank_block(R)
    bm = _row_block(N, block_r, x.device)
    blocks = triton.cdiv(N, bm)
    f32 = dict(device=x.device, dtype=torch.float32)
    acc_dx = dx is not None
    if need_x and dx is None:
        dx = torch.empty(N, IN, device=x.device, dtype=x.dtype)
    gh = torch.empty(N, R, **f32) if need_A else None
    hd = torch.empty(N, R, **f32) if need_B else None
    dd = torch.empty(blocks, R, **f32) if need_d else None
    bn = bk = _INTERP_BLOCK if (_interpreting() or not x.is_cuda) else 64
    _lowrank_bwd_kernel[(blocks,)](
        g, h, A, B, d if d is not None else A,
        dx if need_x else h, gh if need_A else h, hd if need_B else h, dd if need_d else h,
        seed if seed is not None else h,
        N, IN, OUT, R, g.stride(0), A.stride(0), A.stride(1), B.stride(0), B.stride(1), scale, float(p),
        HAS_D=d is not None, NEED_DX=need_x, NEED_GH=need_A, NEED_HD=need_B, NEED_DD=need_d, ACC_DX=acc_dx,
        DROPOUT=seed is not None,
        DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=block_r, num_warps=4,
    )
    dA, dBt = _weight_grads(gh, x, hd, g, dot, prec, seed, p) if (need_A or need_B) else (None, None)  # (R, IN), (R, OUT)
    dA = dA.to(A.dtype) if need_A else None  # (R, IN)
    dB = dBt.t().to(B.dtype) if need_B else None  # (OUT, R)
    dd = dd.sum(0).to(d.dtype) if need_d else None  # (R,)
    return dx, dA, dB, dd


class LowRankAddFunction(torch.autograd.Function):
    """y + scale * ((x A^T) * d) B^T, written into y (contiguous, not a leaf that requires grad)."""

    @staticmethod
    def forward(ctx, y, x, A, B, d, scale):
        IN, OUT = x.shape[-1], y.shape[-1]
        x2 = _rows(x, IN)  # (N, in)
        save_h = any(ctx.needs_input_grad[1:5])
        h = torch.empty(x2.shape[0], A.shape[0], device=x.device, dtype=torch.float32) if save_h else None
        dot, prec = _dot_config(_compute_dtype(x))
        _lowrank_fwd(y.view(-1, OUT), x2, A, B, d, float(scale), h, dot, prec)  # y: (N, out)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x2, A, B, d, h)
        ctx.scale, ctx.dot, ctx.prec, ctx.x_shape = float(scale), dot, prec, x.shape
        return y

    @staticmethod
    def backward(ctx, g):
        x2, A, B, d, h = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[1:5])  # x, A, B, d
        dx = dA = dB = dd = None
        if any(need):
            g2 = _rows(g, g.shape[-1])  # (N, out)
            dx, dA, dB, dd = _lowrank_bwd(g2, x2, A, B, d, h, ctx.scale, need, ctx.dot, ctx.prec)
            dx = dx.view(ctx.x_shape) if dx is not None else None  # (..., in)
        return g if ctx.needs_input_grad[0] else None, dx, dA, dB, dd, None


class LowRankAddTorchFunction(torch.autograd.Function):
    """The same op in plain PyTorch, for where Triton is off (CPU, NANOPEFT_NO_TRITON=1, rank > 128).

    Autograd through `y + (x @ A.T) @ B.T` is correct but slow on CPU: it forms dB = g^T h and g B with
    layouts CPU BLAS handles 5-10x slower than their transposes (measured: dB for a 512 -> 2048 layer,
    N = 512, r = 4: 3.4 ms as g^T h, 0.27 ms as (h^T g)^T), and it allocates y + ... instead of adding into
    y. Here every product is written in its fast layout and the update goes into y in place; on CUDA the
    layouts make no difference.
        forward:  h = x A^T, y += scale (h * d) B^T
        backward: gB = g B, gh = scale gB * d, dx = gh A, dA = gh^T x, dB = scale g^T (h * d),
                  dd = scale Σ_rows h * gB
    """

    @staticmethod
    def forward(ctx, y, x, A, B, d, scale):
        ct = y.dtype  # compute in the activations' dtype (bf16 under autocast, fp32 adapter weights)
        x2 = x.reshape(-1, x.shape[-1]).to(ct)  # (N, in)
        h = _lowrank_fwd_torch(y.view(-1, y.shape[-1]), x2, A, B, d, scale)  # y: (N, out)
        ctx.mark_dirty(y)
        ctx.save_for_backward(x2, A, B, d, h)
        ctx.scale, ctx.x_shape, ctx.x_dtype = scale, x.shape, x.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x2, A, B, d, h = ctx.saved_tensors
        _, nx, nA, nB, nd, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1]).to(h.dtype)  # (N, out)
        dx, dA, dB, dd = _lowrank_bwd_torch(g2, x2, A, B, d, h, ctx.scale, (nx, nA, nB, nd))
        dx = None if dx is None else dx.to(ctx.x_dtype).view(ctx.x_shape)  # (..., in), contiguous
        return g if ctx.needs_input_grad[0] else None, dx, dA, dB, dd, None


def _lowrank_fwd_torch(y2, x2, A, B, d, scale):
    """y2 (N, out) += scale * ((x2 A^T) * d) B^T in place, in y2's dtype; returns h = x2 A^T (N, r)."""
    ct = y2.dtype
    h = torch.mm(A.to(ct), x2.t()).t()  # (N, r), as (A x^T)^T: the fast layout
    hd = h if d is None else h * d.to(ct)  # (N, r)
    y2.addmm_(hd, B.t().to(ct), alpha=scale)  # (N, out) += (N, r) @ (r, out)
    return h


def _lowrank_bwd_torch(g2, x2, A, B, d, h, scale, need, dx=None):
    """(dx, dA, dB, dd) in PyTorch for the flags need = (x, A, B, d), each product in its fast layout; a
    given dx (N, in) receives the low-rank share added in place (as _lowrank_bwd does)."""
    nx, nA, nB, nd = need
    ct = h.dtype
    dA = dB = dd = None
    gB = torch.mm(B.t().to(ct), g2.t()).t() if (nx or nA or nd) else None  # (N, r) = g B
    gh = None if gB is None else scale * (gB if d is None else gB * d.to(ct))  # (N, r): dL/dh
    if nx:
        dx = torch.mm(gh, A.to(ct)) if dx is None else dx.addmm_(gh, A.to(ct))  # (N, in)
    if nA:
        dA = torch.mm(gh.t(), x2).to(A.dtype)  # (r, in)
    if nB:
        hd = h if d is None else h * d.to(ct)  # (N, r)
        dB = (scale * torch.mm(hd.t(), g2).t()).to(B.dtype)  # (out, r), as (hd^T g)^T
    if nd:
        dd = (scale * (h * gB).sum(0)).to(d.dtype)  # (r,)
    return dx, dA, dB, dd


def lowrank_add_reference(y, x, A, B, d=None, scale=1.0):
    """y + scale * ((x A^T) * d) B^T in plain PyTorch (never writes y)."""
    h = x @ A.T  # (..., r)
    if d is not None:
        h = h * d
    return y + scale * (h @ B.T)  # (..., out)


def lowrank_add(y, x, A, B, d=None, scale=1.0):
    """y + scale * ((x A^T) * d) B^T for x (..., in), y (..., out), A (r, in), B (out, r), d (r,) or None.

    y is updated in place and returned when it can be (contiguous, not a leaf that requires grad);
    otherwise a copy is. Callers pass a fresh base output and use only the return value. The Triton
    kernel runs when enabled() and r <= 128; otherwise LowRankAddTorchFunction does the same in PyTorch."""
    r, d_in = A.shape
    if x.shape[-1] != d_in or B.shape[1] != r or y.shape[-1] != B.shape[0] or x.shape[:-1] != y.shape[:-1] \
            or (d is not None and tuple(d.shape) != (r,)):
        raise ValueError(f"lowrank_add: shapes y {tuple(y.shape)}, x {tuple(x.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, d {None if d is None else tuple(d.shape)} do not fit "
                         f"y (..., out), x (..., in), A (r, in), B (out, r), d (r,)")
    if x.numel() == 0:
        return lowrank_add_reference(y, x, A, B, d, scale)
    if not y.is_contiguous() or (y.is_leaf and y.requires_grad):
        y = y.clone(memory_format=torch.contiguous_format)
    if r > _MAX_RANK or not enabled(y, x, A, B, d):
        return LowRankAddTorchFunction.apply(y, x, A, B, d, scale)
    return LowRankAddFunction.apply(y, x, A, B, d, scale)



class LowRankLinearTorchFunction(torch.autograd.Function):
    """y = x W^T + bias + scale * ((x A^T) * d) B^T for a frozen W, the base layer fused in (PyTorch).

    Fusing the base matmul lets the backward write dx = g W + gh A into one buffer (an in-place addmm)
    instead of autograd summing two (N, in) gradients: one full pass over dx less per adapted layer.
    The products use LowRankAddTorchFunction's layouts. dW and dbias are computed only if they require grad.
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, d, scale):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        y = F.linear(x2, W, bias)  # (N, out): the base layer (autocast applies as it would in nn.Linear)
        x2c = x2.to(y.dtype)
        h = _lowrank_fwd_torch(y, x2c, A, B, d, scale)  # (N, r)
        ctx.save_for_backward(x2c, W, A, B, d, h)
        ctx.scale, ctx.x_shape, ctx.x_dtype, ctx.has_bias = scale, x.shape, x.dtype, bias is not None
        return y.view(*x.shape[:-1], -1)  # (..., out)

    @staticmethod
    def backward(ctx, g):
        x2, W, A, B, d, h = ctx.saved_tensors
        nx, nW, nbias, nA, nB, nd, _ = ctx.needs_input_grad
        ct = h.dtype
        g2 = g.reshape(-1, g.shape[-1]).to(ct)  # (N, out)
        dx = torch.mm(g2, W.to(ct)) if nx else None  # (N, in) = g W; the adapter's share is added in place
        dx, dA, dB, dd = _lowrank_bwd_torch(g2, x2, A, B, d, h, ctx.scale, (nx, nA, nB, nd), dx=dx)
        dx = None if dx is None else dx.to(ctx.x_dtype).view(ctx.x_shape)  # (..., in)
        dW = torch.mm(g2.t(), x2).to(W.dtype) if nW else None  # (out, in)
        dbias = g2.sum(0) if nbias else None  # (out,)
        return dx, dW, dbias, dA, dB, dd, None


class LowRankLinearFunction(torch.autograd.Function):
    """y = x W^T + bias + scale * ((x A^T) * d) B^T with the Triton kernels: cuBLAS for the base product, the
    low-rank forward kernel added into its output, and in backward the low-rank dx added into cuBLAS's g W
    in place (one (N, in) buffer, no separate sum). Products run in the compute dtype (autocast's when on),
    as nn.Linear's would; W is cast once and the cast kept for backward, as autocast itself does."""

    @staticmethod
    def forward(ctx, x, W, bias, A, B, d, scale, p, seed):
        ct = _compute_dtype(x)
        x2 = _rows(x, x.shape[-1]).to(ct)  # (N, in)
        Wc = W.to(ct)
        y = F.linear(x2, Wc, None if bias is None else bias.to(ct))  # (N, out)
        save_h = any(ctx.needs_input_grad[3:6])
        h = torch.empty(x2.shape[0], A.shape[0], device=x.device, dtype=torch.float32) if save_h else None
        dot, prec = _dot_config(ct)
        _lowrank_fwd(y, x2, A, B, d, float(scale), h, dot, prec, seed, p)
        ctx.save_for_backward(x2, Wc, A, B, d, h, seed)
        ctx.scale, ctx.p, ctx.dot, ctx.prec, ctx.x_shape, ctx.dtypes = float(scale), p, dot, prec, x.shape, \
            (W.dtype, None if bias is None else bias.dtype)
        return y.view(*x.shape[:-1], -1)  # (..., out)

    @staticmethod
    def backward(ctx, g):
        x2, Wc, A, B, d, h, seed = ctx.saved_tensors
        nx, nW, nbias, nA, nB, nd = ctx.needs_input_grad[:6]
        g2 = _rows(g, g.shape[-1]).to(x2.dtype)  # (N, out)
        dx = torch.mm(g2, Wc) if nx else None  # (N, in) = g W; the kernel adds the low-rank part into it
        _, dA, dB, dd = _lowrank_bwd(g2, x2, A, B, d, h, ctx.scale, (nx, nA, nB, nd), ctx.dot, ctx.prec, dx=dx,
                                     seed=seed, p=ctx.p) if (nx or nA or nB or nd) else (None,) * 4
        dW = torch.mm(g2.t(), x2).to(ctx.dtypes[0]) if nW else None  # (out, in)
        dbias = g2.float().sum(0).to(ctx.dtypes[1]) if nbias else None  # (out,)
        return None if dx is None else dx.view(ctx.x_shape), dW, dbias, dA, dB, dd, None, None, None


def lowrank_linear(x, W, bias, A, B, d=None, scale=1.0, dropout=0.0, seed=None):
    """The whole adapted layer: x W^T + bias + scale * ((dropout(x) A^T) * d) B^T; x (..., in), W (out, in).

    dropout (LoRA's, on the adapter's input only; pass 0 in eval mode) is drawn inside the kernels from
    `seed`, a (1,) int64 tensor on x's device (drawn from torch's generator when None); `dropout_mask`
    gives the mask a seed draws. LowRankLinearFunction (Triton) when enabled() and r <= 128, else
    LowRankLinearTorchFunction (or, with dropout, F.dropout and LowRankAddTorchFunction: torch's mask)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lowrank_linear: dropout must be in [0, 1), got {dropout}")
    if x.numel() and A.shape[0] <= _MAX_RANK and enabled(x, A, B, d):
        if dropout > 0 and seed is None:
            seed = torch.randint(2 ** 31 - 1, (1,), device=x.device)  # device RNG: fresh per CUDA-graph replay
        return LowRankLinearFunction.apply(x, W, bias, A, B, d, scale, float(dropout),
                                           seed if dropout > 0 else None)
    if dropout == 0:
        return LowRankLinearTorchFunction.apply(x, W, bias, A, B, d, scale)
    # 2-D: F.linear returns a view for 3-D x, and adding into a view in place makes autograd copy the whole
    # gradient in backward; a 2-D base output is a tensor of its own
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    y = LowRankAddTorchFunction.apply(F.linear(x2, W, bias), F.dropout(x2, dropout), A, B, d, scale)  # (N, out)
    return y.view(*x.shape[:-1], -1)  # (..., out)


def dropout_mask(seed, n_rows, n_cols, p):
    """The (n_rows, n_cols) bool keep-mask the low-rank kernels draw for seed (a (1,) int64 tensor) and
    dropout p, for an input viewed as (n_rows, n_cols): for tests, and to reproduce a step."""
    out = torch.empty(n_rows, n_cols, device=seed.device, dtype=torch.int8)
    block = 1024
    _dropout_mask_kernel[(triton.cdiv(out.numel(), block),)](seed, out, out.numel(), float(p), BLOCK=block)
    return out.bool()

# -----------------------------------------------------------------------------------------------------
# SeRA: out = scale * x blockdiag(A) C blockdiag(B)
#   A (S, IS, RS), C (R, R), B (S, RS, OS); S = split, IS = in/S, RS = r/S, OS = out/S, R = r
#   Dense views (never stored): Ad (IN, R), Ad[k, c] = A[k//IS, k%IS, c%RS] if k//IS == c//RS else 0, i.e.
#   A's flat index k*RS + c%RS; Bd (R, OUT), Bd[c, o] = B[c//RS, c%RS, o%OS] if c//RS == o//OS, flat c*OS + o%OS.

if triton is not None:

    @triton.jit
    def _sera_fwd_kernel(
        x_ptr,  # (N, IN) input, unit column stride
        a_ptr,  # (S, IS, RS) contiguous
        c_ptr,  # (R, R) contiguous
        b_ptr,  # (S, RS, OS) contiguous
        out_ptr,  # (N, OUT) contiguous output
        h_ptr,  # (N, R) fp32: h1 = x Ad saved for the backward; written only if SAVE_H
        N, IN, OUT, R, IS, RS, OS,
        stride_x,
        scale,
        SAVE_H: tl.constexpr,
        DOT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        ranks = tl.arange(0, BLOCK_R)
        rmask, kmask = rows < N, ranks < R
        h1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < IN
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                        other=0.0)
            am = cmask[:, None] & kmask[None, :] & (cols[:, None] // IS == ranks[None, :] // RS)
            ad = tl.load(a_ptr + cols[:, None] * RS + (ranks % RS)[None, :], mask=am, other=0.0)  # (BLOCK_K, BLOCK_R)
            h1 = tl.dot(x.to(DOT), ad.to(DOT), h1, input_precision=PREC)
        if SAVE_H:
            tl.store(h_ptr + rows[:, None] * R + ranks[None, :], h1, mask=rmask[:, None] & kmask[None, :])
        c = tl.load(c_ptr + ranks[:, None] * R + ranks[None, :], mask=kmask[:, None] & kmask[None, :], other=0.0)
        h2 = (tl.dot(h1.to(DOT), c.to(DOT), input_precision=PREC) * scale).to(DOT)  # (BLOCK_M, BLOCK_R)
        for n0 in range(0, OUT, BLOCK_N):
            outs = n0 + tl.arange(0, BLOCK_N)
            omask = outs < OUT
            bm = kmask[:, None] & omask[None, :] & (ranks[:, None] // RS == outs[None, :] // OS)
            bd = tl.load(b_ptr + ranks[:, None] * OS + (outs % OS)[None, :], mask=bm, other=0.0)  # (BLOCK_R, BLOCK_N)
            o = tl.dot(h2, bd.to(DOT), input_precision=PREC)
            tl.store(out_ptr + rows[:, None] * OUT + outs[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=rmask[:, None] & omask[None, :])

    # Backward. With g = dL/dout (N, OUT), h1 = x Ad, h2 = h1 C (both (N, R)), s = scale, out = s h2 Bd:
    #   gh2 = s * g Bd^T           (N, R)
    #   dBd = s * h2^T g           (R, OUT), kept on the diagonal blocks only -> column pass with U = s*h2
    #   dC  = h1^T gh2             (R, R)    -> per-row-block partials here, summed on the host
    #   gh1 = gh2 C^T              (N, R)
    #   dAd = x^T gh1              (IN, R), diagonal blocks only -> column pass with U = gh1 (gives dAd^T)
    #   dx  = gh1 Ad^T             (N, IN)   -> this kernel
    @triton.jit
    def _sera_bwd_kernel(
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
        stride_g,
        scale,
        NEED_DX: tl.constexpr, NEED_GH: tl.constexpr, NEED_H2: tl.constexpr, NEED_DC: tl.constexpr,
        DOT: tl.constexpr, PREC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        ranks = tl.arange(0, BLOCK_R)
        rmask, kmask = rows < N, ranks < R
        hmask = rmask[:, None] & kmask[None, :]
        cmask2 = kmask[:, None] & kmask[None, :]
        h1 = tl.load(h_ptr + rows[:, None] * R + ranks[None, :], mask=hmask, other=0.0)
        c = tl.load(c_ptr + ranks[:, None] * R + ranks[None, :], mask=cmask2, other=0.0).to(DOT)
        gh2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, OUT, BLOCK_N):
            outs = n0 + tl.arange(0, BLOCK_N)
            omask = outs < OUT
            g = tl.load(g_ptr + rows[:, None] * stride_g + outs[None, :], mask=rmask[:, None] & omask[None, :],
                        other=0.0)
            bm = omask[:, None] & kmask[None, :] & (outs[:, None] // OS == ranks[None, :] // RS)
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
                am = kmask[:, None] & cmask[None, :] & (ranks[:, None] // RS == cols[None, :] // IS)
                # (BLOCK_R, BLOCK_K) = Ad^T tile
                adt = tl.load(a_ptr + cols[None, :] * RS + (ranks % RS)[:, None], mask=am, other=0.0)
                dx = tl.dot(gh1d, adt.to(DOT), input_precision=PREC)
                tl.store(dx_ptr + rows[:, None] * IN + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                         mask=rmask[:, None] & cmask[None, :])


def _sera_tiles(x):
    if _interpreting() or not x.is_cuda:
        return dict(BLOCK_N=_INTERP_BLOCK, BLOCK_K=_INTERP_BLOCK, num_warps=4)
    return dict(BLOCK_N=64, BLOCK_K=64, num_warps=4)


def _sera_fwd(x, A, C, B, scale, h1, out, dot, prec):
    """out (N, OUT) = scale * x Ad C Bd; h1 (N, R) fp32 receives x Ad when not None."""
    N, IN = x.shape
    S, IS, RS = A.shape
    OS = B.shape[2]
    R, OUT = S * RS, S * OS
    block_r = _rank_block(R)
    bm = _row_block(N, block_r, x.device)
    _sera_fwd_kernel[(triton.cdiv(N, bm),)](
        x, A, C, B, out, h1 if h1 is not None else x, N, IN, OUT, R, IS, RS, OS, x.stride(0), scale,
        SAVE_H=h1 is not None, DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_R=block_r, **_sera_tiles(x),
    )


def _sera_bwd(g, x, A, C, B, h1, scale, need, dot, prec):
    """Gradients (dx, dA, dC, dB) for the flags in need = (x, A, C, B); None where not needed."""
    need_x, need_A, need_C, need_B = need
    N, IN = x.shape
    S, IS, RS = A.shape
    OS = B.shape[2]
    R, OUT = S * RS, S * OS
    block_r = _rank_block(R)
    bm = _row_block(N, block_r, x.device)
    blocks = triton.cdiv(N, bm)
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty(N, IN, device=x.device, dtype=x.dtype) if need_x else None
    gh1 = torch.empty(N, R, **f32) if need_A else None
    h2 = torch.empty(N, R, **f32) if need_B else None
    dc = torch.empty(blocks, R, R, **f32) if need_C else None
    _sera_bwd_kernel[(blocks,)](
        g, h1, A, C, B, dx if need_x else h1, gh1 if need_A else h1, h2 if need_B else h1, dc if need_C else h1,
        N, IN, OUT, R, IS, RS, OS, g.stride(0), scale,
        NEED_DX=need_x, NEED_GH=need_A, NEED_H2=need_B, NEED_DC=need_C,
        DOT=dot, PREC=prec, BLOCK_M=bm, BLOCK_R=block_r, **_sera_tiles(x),
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
    """scale * x blockdiag(A) C blockdiag(B), shape (..., out)."""

    @staticmethod
    def forward(ctx, x, A, C, B, scale):
        IN = x.shape[-1]
        S, _, RS = A.shape
        OUT = S * B.shape[2]
        x2 = _rows(x, IN)  # (N, in)
        A, C, B = A.contiguous(), C.contiguous(), B.contiguous()
        cdt = _compute_dtype(x)
        dot, prec = _dot_config(cdt)
        out = torch.empty(x2.shape[0], OUT, device=x.device, dtype=cdt)
        save_h = any(ctx.needs_input_grad[:4])
        h1 = torch.empty(x2.shape[0], S * RS, device=x.device, dtype=torch.float32) if save_h else None
        _sera_fwd(x2, A, C, B, float(scale), h1, out, dot, prec)
        ctx.save_for_backward(x2, A, C, B, h1)
        ctx.scale, ctx.dot, ctx.prec, ctx.x_shape = float(scale), dot, prec, x.shape
        return out.view(*x.shape[:-1], OUT)  # (..., out)

    @staticmethod
    def backward(ctx, g):
        x2, A, C, B, h1 = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:4])  # x, A, C, B
        g2 = _rows(g, g.shape[-1])  # (N, out)
        dx, dA, dC, dB = _sera_bwd(g2, x2, A, C, B, h1, ctx.scale, need, ctx.dot, ctx.prec)
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
    if S * RS > _MAX_RANK or x.numel() == 0:
        return sera_delta_reference(x, A, C, B, scale)
    return SeRADeltaFunction.apply(x, A, C, B, scale)


# -----------------------------------------------------------------------------
# Shared by the two Bone ops (VB-LoRA's compose has no matmul).


def _dot_flags(t):
    """(DOT_F32, PREC) for the kernels' tl.dot calls.

    DOT_F32: True under TRITON_INTERPRET=1, whose bf16/fp16 tl.dot returns garbage
    (triton 3.9), so the operands are upcast there; on CUDA the dot runs in the native dtype.
    PREC: fp32 x fp32 dots follow torch's own switch, so fp32 results match torch.matmul.
    """
    return _interpreting(), _dot_config(torch.float32)[1]  # the same switches as the other ops' dots


if triton is not None:

    @triton.jit
    def _bone_dot(a, b, acc, DOT_F32: tl.constexpr, PREC: tl.constexpr):
        # acc += a @ b with b in a's dtype (tensor cores need equal operand types), fp32 accumulator
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            b = b.to(a.dtype)
        return tl.dot(a, b, acc, input_precision=PREC)

    @triton.jit
    def _bone_tile(pid, b, BLOCK_B: tl.constexpr):
        # program pid -> (block, p rows, q cols) of a (blocks, b, b) tensor, cdiv(b, BLOCK_B)^2 tiles per block
        nt = tl.cdiv(b, BLOCK_B)
        p = (pid // nt) % nt * BLOCK_B + tl.arange(0, BLOCK_B)
        q = pid % nt * BLOCK_B + tl.arange(0, BLOCK_B)
        return pid // (nt * nt), p, q


# -----------------------------------------------------------------------------
# VB-LoRA: top-k admixture of a shared vector bank
#   out[s] = sum_{i in topk(logits[s])} softmax(topk values)_i * bank[idx_i]
# The top-k selection runs on the host (torch.topk): picking k (a few) of h (<= ~1k) values per row is
# cheap and well tuned there; the kernel fuses what would otherwise be three passes over (S, k, b)
# (softmax, gather, weighted sum). The backward's bank gradient is a scatter-add (several sub-vectors
# pick the same bank vector); it is done deterministically: entries are sorted by bank row on the host,
# then one program per bank row sums its entries in a fixed order (no atomics, bit-reproducible). A bank
# row picked by many sub-vectors makes its program long; with the paper's random logits the picks spread
# over all h rows.

_VB_BLOCK_E = 32  # bank-gradient entries summed per loop step
_VB_TILE = 4096  # elements of a (rows x b-columns) tile; rows per program = _VB_TILE / b-tile width

if triton is not None:

    @triton.jit
    def _vblora_compose_fwd_kernel(
        VALS,  # (S, k) top-k logits of each row, any float dtype
        IDX,  # (S, k) int64 bank rows they select
        BANK,  # (h, b) vector bank
        OUT,  # (S, b) output
        WGT,  # (S, k) fp32 softmax weights, saved for backward
        S, K, NB,  # rows, k, b (sub-vector length)
        BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, K_PAD: tl.constexpr, KC: tl.constexpr,
    ):
        pid_s = tl.program_id(0).to(tl.int64)
        pid_b = tl.program_id(1)
        rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        kcol = tl.arange(0, K_PAD)
        cols = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        rm = rows < S
        km = kcol < K
        cm = cols < NB
        v = tl.load(VALS + rows[:, None] * K + kcol[None, :], mask=rm[:, None] & km[None, :], other=float("-inf"))
        v = tl.where(rm[:, None], v.to(tl.float32), 0.0)  # rows past S: finite dummies, never stored
        e = tl.exp(v - tl.max(v, axis=1)[:, None])
        w = e / tl.sum(e, axis=1)[:, None]  # (BLOCK_S, K_PAD)
        acc = tl.zeros((BLOCK_S, BLOCK_B), dtype=tl.float32)
        for i in tl.static_range(KC):
            w_i = tl.sum(tl.where(kcol[None, :] == i, w, 0.0), axis=1)  # column i of w
            idx_i = tl.load(IDX + rows * K + i, mask=rm, other=0)
            vec = tl.load(BANK + idx_i[:, None] * NB + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
            acc += w_i[:, None] * vec.to(tl.float32)
        tl.store(OUT + rows[:, None] * NB + cols[None, :], acc.to(OUT.dtype.element_ty), mask=rm[:, None] & cm[None, :])
        if pid_b == 0:
            tl.store(WGT + rows[:, None] * K + kcol[None, :], w, mask=rm[:, None] & km[None, :])

    # Backward, logits part. With g = dL/dout[s] and w = softmax(v) over the k selected logits v:
    #   dw_i     = g . bank[idx_i]                       (out is linear in w)
    #   dv_i     = w_i (dw_i - sum_j w_j dw_j)            (softmax Jacobian diag(w) - w w^T)
    #   dlogits[s, idx_i] = dv_i, zero at the h - k unselected entries (top-k is piecewise constant).
    @triton.jit
    def _vblora_compose_bwd_kernel(
        G,  # (S, b) dL/dout
        IDX,  # (S, k) int64 selected bank rows
        WGT,  # (S, k) fp32 softmax weights from forward
        BANK,  # (h, b) vector bank
        DLOGITS,  # (S, h) zero-filled; the k selected entries of each row are written
        S, K, NB, H,  # rows, k, b, h
        BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr, K_PAD: tl.constexpr, KC: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
        kcol = tl.arange(0, K_PAD)
        rm = rows < S
        km = kcol < K
        idx = tl.load(IDX + rows[:, None] * K + kcol[None, :], mask=rm[:, None] & km[None, :], other=0)
        w = tl.load(WGT + rows[:, None] * K + kcol[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        dw = tl.zeros((BLOCK_S, K_PAD), dtype=tl.float32)
        for i in tl.static_range(KC):
            idx_i = tl.load(IDX + rows * K + i, mask=rm, other=0)
            dw_i = tl.zeros((BLOCK_S,), dtype=tl.float32)
            for c0 in range(0, NB, BLOCK_B):
                cols = c0 + tl.arange(0, BLOCK_B)
                m2 = rm[:, None] & (cols < NB)[None, :]
                g = tl.load(G + rows[:, None] * NB + cols[None, :], mask=m2, other=0.0).to(tl.float32)
                vec = tl.load(BANK + idx_i[:, None] * NB + cols[None, :], mask=m2, other=0.0).to(tl.float32)
                dw_i += tl.sum(g * vec, axis=1)
            dw = tl.where(kcol[None, :] == i, dw_i[:, None], dw)
        dv = w * (dw - tl.sum(w * dw, axis=1)[:, None])  # (BLOCK_S, K_PAD)
        tl.store(DLOGITS + rows[:, None] * H + idx, dv.to(DLOGITS.dtype.element_ty), mask=rm[:, None] & km[None, :])

    # Backward, bank part: dbank[r] = sum over entries (s, i) with idx[s, i] == r of w[s, i] g[s].
    # ORDER lists the S*k entries e = s*k + i sorted by bank row; row r owns ORDER[START[r] : START[r] + COUNT[r]].
    @triton.jit
    def _vblora_compose_bwd_bank_kernel(
        G,  # (S, b) dL/dout
        WGT,  # (S*k,) fp32 softmax weights, flattened
        ORDER,  # (S*k,) int64 entry ids sorted by bank row
        START, COUNT,  # (h,) int64 first position in ORDER and number of entries per bank row
        DBANK,  # (h, b) output; rows no entry selects get 0
        K, NB,  # k, b
        BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        cm = cols < NB
        start = tl.load(START + r)
        end = start + tl.load(COUNT + r)
        acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for e0 in range(start, end, BLOCK_E):
            pos = e0 + tl.arange(0, BLOCK_E)
            em = pos < end
            ent = tl.load(ORDER + pos, mask=em, other=0)
            w = tl.load(WGT + ent, mask=em, other=0.0)
            g = tl.load(G + (ent // K)[:, None] * NB + cols[None, :], mask=em[:, None] & cm[None, :], other=0.0)
            acc += tl.sum(w[:, None] * g.to(tl.float32), axis=0)
        tl.store(DBANK + r * NB + cols, acc.to(DBANK.dtype.element_ty), mask=cm)


def _vblora_blocks(k, nb):
    block_b = min(triton.next_power_of_2(nb), 128)
    return _VB_TILE // block_b, block_b, triton.next_power_of_2(k)


def _vblora_compose_fwd(logits, bank, k):
    S, nb = logits.shape[0], bank.shape[1]
    vals, idx = torch.topk(logits, k, dim=-1)  # (S, k) each
    idx = idx.contiguous()
    out = torch.empty(S, nb, device=bank.device, dtype=torch.promote_types(logits.dtype, bank.dtype))
    wgt = torch.empty(S, k, device=bank.device, dtype=torch.float32)
    block_s, block_b, k_pad = _vblora_blocks(k, nb)
    grid = (triton.cdiv(S, block_s), triton.cdiv(nb, block_b))
    _vblora_compose_fwd_kernel[grid](vals.contiguous(), idx, bank, out, wgt, S, k, nb,
                                     BLOCK_S=block_s, BLOCK_B=block_b, K_PAD=k_pad, KC=k)
    return out, idx, wgt


def _vblora_compose_bwd(g, idx, wgt, bank, logits_dtype, need_logits, need_bank):
    S, k = idx.shape
    h, nb = bank.shape
    block_s, block_b, k_pad = _vblora_blocks(k, nb)
    dlogits = dbank = None
    if need_logits:
        dlogits = torch.zeros(S, h, device=g.device, dtype=logits_dtype)
        _vblora_compose_bwd_kernel[(triton.cdiv(S, block_s),)](g, idx, wgt, bank, dlogits, S, k, nb, h,
                                                                BLOCK_S=block_s, BLOCK_B=block_b, K_PAD=k_pad, KC=k)
    if need_bank:
        flat = idx.flatten()  # (S*k,) entry e = s*k + i
        order = torch.argsort(flat, stable=True)  # (S*k,) a fixed summation order per bank row
        count = torch.zeros(h, device=flat.device, dtype=flat.dtype).scatter_add_(0, flat, torch.ones_like(flat))  # (h,)
        # (scatter_add_, not bincount: bincount syncs with the host, which CUDA graph capture forbids)
        start = torch.cumsum(count, 0) - count  # (h,)
        dbank = torch.empty_like(bank)
        _vblora_compose_bwd_bank_kernel[(h, triton.cdiv(nb, block_b))](g, wgt, order, start, count, dbank, k, nb,
                                                                       BLOCK_E=_VB_BLOCK_E, BLOCK_B=block_b)
    return dlogits, dbank


class VBLoRAComposeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, bank, k):
        out, idx, wgt = _vblora_compose_fwd(logits.contiguous(), bank.contiguous(), k)
        ctx.save_for_backward(idx, wgt, bank)
        ctx.logits_dtype = logits.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        idx, wgt, bank = ctx.saved_tensors
        dlogits, dbank = _vblora_compose_bwd(g.contiguous(), idx, wgt, bank.contiguous(), ctx.logits_dtype,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dlogits, dbank, None


def vblora_compose_reference(logits, bank, k):
    """Plain PyTorch: (S, h) logits, (h, b) bank -> (S, b); fp32 maths, result in the promoted dtype."""
    vals, idx = torch.topk(logits, k, dim=-1)  # (S, k)
    w = torch.softmax(vals.float(), dim=-1)  # (S, k)
    out = torch.einsum("sk,skb->sb", w, bank.float()[idx])  # bank[idx]: (S, k, b)
    return out.to(torch.promote_types(logits.dtype, bank.dtype))


def vblora_compose(logits, bank, k):
    """Triton top-k admixture: logits (S, h), bank (h, b) -> (S, b); grads to logits and bank."""
    if logits.dim() != 2 or bank.dim() != 2 or logits.shape[1] != bank.shape[0]:
        raise ValueError(f"vblora_compose: need logits (S, h) and bank (h, b), got {tuple(logits.shape)} "
                         f"and {tuple(bank.shape)}")
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"vblora_compose: k={k} must be in [1, h={bank.shape[0]}]")
    return VBLoRAComposeFunction.apply(logits, bank, k)


# -----------------------------------------------------------------------------
# Bone-row prologue: x (M, in) viewed as (M, in/b, b) chunks x_j, one B_j (b, b) per input chunk
#   t_j = x_j B_j^T,   returns  x + t  (M, in)  and  sum_j t_j  (M, b)
# so that the Bone-row layer is y = (x + t) W^T + tile(sum_j t_j) (SPEC §5) without forming W'.
# Tiles: BLOCK_M rows, and within a chunk BLOCK_B columns (b padded to a power of two, masked), so
# any b works and b > 64 loops over 64-wide tiles instead of holding a b x b tile.

_BONE_BLOCK_M = 64
_BONE_BLOCK = 64  # cap on the b-tiles of both Bone ops
_BONE_TARGET_PROGRAMS = 512  # split the weight-gradient reductions until roughly this many programs run

if triton is not None:

    @triton.jit
    def _bone_row_fwd_kernel(
        X,  # (M, IN) input
        BW,  # (IN/b, b, b) Bone blocks B_j
        Y,  # (M, IN) x + t
        TS,  # (M, b) sum_j t_j
        M, IN, NBLK, b,  # rows, in, in/b, b
        BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        p = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)  # output columns within a chunk
        rm = rows < M
        pm = p < b
        ts = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
        for j in range(NBLK):
            t = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
            for q0 in range(0, b, BLOCK_B):
                q = q0 + tl.arange(0, BLOCK_B)
                qm = q < b
                x = tl.load(X + rows[:, None] * IN + j * b + q[None, :], mask=rm[:, None] & qm[None, :], other=0.0)
                bt = tl.load(BW + j * b * b + p[None, :] * b + q[:, None], mask=qm[:, None] & pm[None, :], other=0.0)
                t = _bone_dot(x, bt, t, DOT_F32, PREC)  # x_j B_j^T tile
            offs = rows[:, None] * IN + j * b + p[None, :]
            mask = rm[:, None] & pm[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0)
            tl.store(Y + offs, (x.to(tl.float32) + t).to(Y.dtype.element_ty), mask=mask)
            ts += t
        tl.store(TS + rows[:, None] * b + p[None, :], ts.to(TS.dtype.element_ty), mask=rm[:, None] & pm[None, :])

    # Backward. With gx = dL/d(x + t) and gs = dL/d(sum_j t_j), t_j enters both outputs, so
    #   dt_j = gx_j + gs                     (M, b)
    #   dx_j = gx_j + dt_j B_j               (identity path + through t_j = x_j B_j^T)
    #   dB_j = dt_j^T x_j                    (b, b), a sum over all M rows
    # This kernel computes dx: one program per (row block, chunk j, column tile of dx_j).
    @triton.jit
    def _bone_row_bwd_kernel(
        GX,  # (M, IN) dL/d(x + t)
        GS,  # (M, b) dL/d(sum_j t_j)
        BW,  # (IN/b, b, b) Bone blocks
        DX,  # (M, IN) output
        M, IN, b,  # rows, in, b
        BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        j = tl.program_id(1)
        q = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
        rm = rows < M
        qm = q < b
        acc = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
        for p0 in range(0, b, BLOCK_B):
            p = p0 + tl.arange(0, BLOCK_B)
            m2 = rm[:, None] & (p < b)[None, :]
            gx = tl.load(GX + rows[:, None] * IN + j * b + p[None, :], mask=m2, other=0.0)
            gs = tl.load(GS + rows[:, None] * b + p[None, :], mask=m2, other=0.0)
            dt = (gx.to(tl.float32) + gs.to(tl.float32)).to(GX.dtype.element_ty)
            bj = tl.load(BW + j * b * b + p[:, None] * b + q[None, :], mask=(p < b)[:, None] & qm[None, :], other=0.0)
            acc = _bone_dot(dt, bj, acc, DOT_F32, PREC)
        offs = rows[:, None] * IN + j * b + q[None, :]
        mask = rm[:, None] & qm[None, :]
        gx = tl.load(GX + offs, mask=mask, other=0.0)
        tl.store(DX + offs, (gx.to(tl.float32) + acc).to(DX.dtype.element_ty), mask=mask)

    # dB_j = dt_j^T x_j: program (chunk j, tile (p, q) of dB_j, split s) sums row blocks s, s + SPLIT, ...
    # into its own slice of a fp32 partial buffer; the host sums the SPLIT slices (deterministic).
    @triton.jit
    def _bone_row_bwd_dB_kernel(
        GX, GS, X,  # (M, IN), (M, b), (M, IN)
        DBP,  # (SPLIT, IN/b, b, b) fp32 partial sums
        M, IN, NBLK, b, SPLIT,  # rows, in, in/b, b, number of row splits
        BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    ):
        j, p, q = _bone_tile(tl.program_id(0), b, BLOCK_B)
        pm = p < b
        qm = q < b
        split = tl.program_id(1)
        acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
        for m0 in range(split * BLOCK_M, M, SPLIT * BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
            rm = rows < M
            gx = tl.load(GX + rows[None, :] * IN + j * b + p[:, None], mask=pm[:, None] & rm[None, :], other=0.0)
            gs = tl.load(GS + rows[None, :] * b + p[:, None], mask=pm[:, None] & rm[None, :], other=0.0)
            dtT = (gx.to(tl.float32) + gs.to(tl.float32)).to(GX.dtype.element_ty)  # (BLOCK_B, BLOCK_M)
            x = tl.load(X + rows[:, None] * IN + j * b + q[None, :], mask=rm[:, None] & qm[None, :], other=0.0)
            acc = _bone_dot(dtT, x, acc, DOT_F32, PREC)
        out = DBP + split.to(tl.int64) * NBLK * b * b + j * b * b
        tl.store(out + p[:, None] * b + q[None, :], acc, mask=pm[:, None] & qm[None, :])


def _bone_blocks(b):
    return max(16, min(_BONE_BLOCK, triton.next_power_of_2(b)))


def _bone_row_fwd(x, B):
    M, n_in = x.shape
    nblk, b = B.shape[0], B.shape[1]
    y = torch.empty_like(x)
    ts = torch.empty(M, b, device=x.device, dtype=x.dtype)
    bb = _bone_blocks(b)
    dot_f32, prec = _dot_flags(x)
    grid = (triton.cdiv(M, _BONE_BLOCK_M), triton.cdiv(b, bb))
    _bone_row_fwd_kernel[grid](x, B, y, ts, M, n_in, nblk, b,
                               BLOCK_M=_BONE_BLOCK_M, BLOCK_B=bb, DOT_F32=dot_f32, PREC=prec)
    return y, ts


def _bone_row_bwd(gx, gs, x, B, need_x, need_B):
    M, n_in = x.shape
    nblk, b = B.shape[0], B.shape[1]
    bb = _bone_blocks(b)
    nt = triton.cdiv(b, bb)
    dot_f32, prec = _dot_flags(x)
    dx = dB = None
    if need_x:
        dx = torch.empty_like(gx)
        _bone_row_bwd_kernel[(triton.cdiv(M, _BONE_BLOCK_M), nblk, nt)](gx, gs, B, dx, M, n_in, b,
                                                                        BLOCK_M=_BONE_BLOCK_M, BLOCK_B=bb,
                                                                        DOT_F32=dot_f32, PREC=prec)
    if need_B:
        tiles = nblk * nt * nt
        split = max(1, min(triton.cdiv(M, _BONE_BLOCK_M), triton.cdiv(_BONE_TARGET_PROGRAMS, tiles)))
        part = torch.empty(split, nblk, b, b, device=x.device, dtype=torch.float32)
        _bone_row_bwd_dB_kernel[(tiles, split)](gx, gs, x, part, M, n_in, nblk, b, split,
                                               BLOCK_M=_BONE_BLOCK_M, BLOCK_B=bb, DOT_F32=dot_f32, PREC=prec)
        dB = part.sum(0).to(B.dtype)  # (in/b, b, b)
    return dx, dB


class BoneRowPrologueFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, B):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (M, in)
        B = B.contiguous()
        y, ts = _bone_row_fwd(x2, B)
        ctx.save_for_backward(x2, B)
        return y.view(x.shape), ts.view(*x.shape[:-1], B.shape[1])

    @staticmethod
    def backward(ctx, gy, gts):
        x2, B = ctx.saved_tensors
        gx = gy.reshape(x2.shape).contiguous()  # (M, in)
        gs = gts.reshape(x2.shape[0], B.shape[1]).contiguous()  # (M, b)
        dx, dB = _bone_row_bwd(gx, gs, x2, B, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (None if dx is None else dx.view(gy.shape)), dB


def bone_row_reference(x, B):
    """Plain PyTorch: x (..., in), B (in/b, b, b) -> (x + t (..., in), sum_j t_j (..., b))."""
    nblk, b = B.shape[0], B.shape[1]
    xs = x.reshape(*x.shape[:-1], nblk, b)  # (..., in/b, b)
    t = torch.einsum("...jq,jpq->...jp", xs, B)  # (..., in/b, b): t_j = x_j B_j^T
    return (xs + t).reshape(x.shape), t.sum(-2)  # (..., in), (..., b)


def _autocast_input(x):
    """x in the autocast dtype when autocast is on: the Bone kernels compute and return in x's dtype, and an
    fp32 activation (e.g. from a LayerNorm) would otherwise run fp32 dots and hand fp32 on to bf16 layers."""
    dev = x.device.type
    return x.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else x


def bone_row(x, B):
    """Triton Bone-row prologue: x (..., in), B (in/b, b, b) -> (x + t, sum_j t_j); grads to x and B."""
    if B.dim() != 3 or B.shape[1] != B.shape[2] or x.shape[-1] != B.shape[0] * B.shape[1]:
        raise ValueError(f"bone_row: need B (in/b, b, b) with in = {x.shape[-1]}, got {tuple(B.shape)}")
    return BoneRowPrologueFunction.apply(_autocast_input(x), B)


# -----------------------------------------------------------------------------
# Bone-col linear: y = x W'^T + bias with W'_ij = W_ij + W_ij B_i + B_i (b x b blocks; i over out/b,
# j over in/b; one B_i per output row-block). W' has no factorisation through x (SPEC §5).
#
# Design, measured on an H100 (bf16, N=4096, 1024 -> 4096, b=64; `python kernels.py`): a first version
# formed each W' tile in registers inside a Triton matmul and reduced dW' tile by tile into dB, so W' and
# dW' never existed in memory. It ran at 60-80 TFLOP/s against cuBLAS's 400-500 on the same products:
# the W' tile costs b/BLOCK_M extra flops per row block, its registers spill, and a hand-written matmul
# does not match cuBLAS here. So the three big products (x W'^T, g W', g^T x) stay with cuBLAS and the
# kernels do the memory-bound parts around them, in one pass each:
#   fwd kernel:  W' formed block by block from W (any dtype) and B, written once in the compute dtype
#                (the bf16 copy autocast would make of W anyway; torch needs five passes for it)
#   bwd kernel:  dB_i = sum_j (W_ij + I)^T G_ij from G = dW' = g^T x, one read of G and W
# W' and G are transient (one layer's worth, freed at once); only x, W and B are saved for backward.
#   W'_ij[p, q] = W_ij[p, q] + sum_r W_ij[p, r] B_i[r, q] + B_i[p, q]

if triton is not None:

    @triton.jit
    def _bone_col_wprime_tile(W, BW, i, j, p, q, IN, b, BLOCK_B: tl.constexpr, DOT_F32: tl.constexpr,
                              PREC: tl.constexpr, DOT_DT: tl.constexpr):
        # fp32 tile W'_ij[p, q] (p, q: index vectors within the b x b block); the W_ij B_i product runs in
        # DOT_DT, W's own dtype or the output's if narrower (W B is a small correction to W: bf16 operands
        # cost it less than the bf16 rounding of W' itself)
        pm = p < b
        qm = q < b
        wrow = (i * b + p).to(tl.int64) * IN + j * b  # (BLOCK_B,) start of each W row inside block ij
        bi = BW + i * b * b  # B holds out*b elements: int32 is enough
        w = tl.load(W + wrow[:, None] + q[None, :], mask=pm[:, None] & qm[None, :], other=0.0)
        wb = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
        for r0 in range(0, b, BLOCK_B):
            r = r0 + tl.arange(0, BLOCK_B)
            rmk = r < b
            wr = tl.load(W + wrow[:, None] + r[None, :], mask=pm[:, None] & rmk[None, :], other=0.0)
            br = tl.load(bi + r[:, None] * b + q[None, :], mask=rmk[:, None] & qm[None, :], other=0.0)
            wb = _bone_dot(wr.to(DOT_DT), br, wb, DOT_F32, PREC)
        bpq = tl.load(bi + p[:, None] * b + q[None, :], mask=pm[:, None] & qm[None, :], other=0.0)
        return w.to(tl.float32) + wb + bpq.to(tl.float32)

    # Forward: one program per (row-block i, p-tile) x column block j; it writes W'_ij's rows p, all q.
    @triton.jit
    def _bone_col_wprime_kernel(
        W,  # (OUT, IN) frozen weight
        BW,  # (OUT/b, b, b) Bone blocks B_i
        WP,  # (OUT, IN) output W' in the compute dtype
        IN, b,
        BLOCK_B: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, DOT_DT: tl.constexpr,
    ):
        nt = tl.cdiv(b, BLOCK_B)
        i = tl.program_id(0).to(tl.int64) // nt
        p = tl.program_id(0) % nt * BLOCK_B + tl.arange(0, BLOCK_B)
        j = tl.program_id(1).to(tl.int64)
        pm = p < b
        for q0 in range(0, b, BLOCK_B):
            q = q0 + tl.arange(0, BLOCK_B)
            wp = _bone_col_wprime_tile(W, BW, i, j, p, q, IN, b, BLOCK_B, DOT_F32, PREC, DOT_DT)  # (p, q) fp32
            out = WP + (i * b + p).to(tl.int64)[:, None] * IN + j * b + q[None, :]
            tl.store(out, wp.to(WP.dtype.element_ty), mask=pm[:, None] & (q < b)[None, :])

    # Backward. With g = dL/dy (M, out), G = dL/dW' = g^T x (out, in) and its b x b blocks G_ij:
    #   dx    = g W'                                    (cuBLAS, W' re-formed by the forward kernel)
    #   G     = g^T x                                   (cuBLAS)
    #   dB_i  = sum_j (W_ij^T G_ij + G_ij) = sum_j (W_ij + I)^T G_ij     (this kernel)
    #           (W'_ij is affine in B_i: d tr(G^T W B)/dB = W^T G, and the + B_i term gives G)
    #   dbias = sum over rows of g
    # Program (i, tile (p, q), split s) sums j = s, s + SPLIT, ... into its fp32 dB tile; the host adds the
    # SPLIT slices (a fixed order: deterministic, no atomics).
    @triton.jit
    def _bone_col_dB_kernel(
        G, W,  # (OUT, IN) dW' and the frozen weight
        DBP,  # (SPLIT, OUT/b, b, b) fp32 partial sums
        IN, NBO, NBI, b, SPLIT,  # in, out/b, in/b, b, number of j splits
        BLOCK_B: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    ):
        i, p, q = _bone_tile(tl.program_id(0), b, BLOCK_B)
        pm = p < b
        qm = q < b
        split = tl.program_id(1)
        acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
        for j in range(split, NBI, SPLIT):
            for r0 in range(0, b, BLOCK_B):
                r = r0 + tl.arange(0, BLOCK_B)
                rmk = r < b
                row = (i * b + r).to(tl.int64) * IN + j * b  # (BLOCK_B,) start of row r of block ij
                g = tl.load(G + row[:, None] + q[None, :], mask=rmk[:, None] & qm[None, :], other=0.0)  # (r, q)
                wT = tl.load(W + row[None, :] + p[:, None], mask=pm[:, None] & rmk[None, :],
                             other=0.0)  # W_ij[r, p] as (p, r)
                eye = tl.where(p[:, None] == r[None, :], 1.0, 0.0)  # (p, r): the + I, kept apart from W
                # both products in G's dtype, fp32 sums: 1 + W_pp in bf16 would round W_pp away, I alone is exact
                acc = _bone_dot(wT.to(G.dtype.element_ty), g, acc, DOT_F32, PREC)
                acc = _bone_dot(eye.to(G.dtype.element_ty), g, acc, DOT_F32, PREC)
        out = DBP + split.to(tl.int64) * NBO * b * b + i.to(tl.int64) * b * b
        tl.store(out + p[:, None] * b + q[None, :], acc, mask=pm[:, None] & qm[None, :])


def _bone_col_wprime(W, B, dtype):
    """W' (out, in) in `dtype`, formed from W and B in one pass."""
    n_out, n_in = W.shape
    b = B.shape[1]
    bb = _bone_blocks(b)
    dot_f32, prec = _dot_flags(W)
    Wp = torch.empty(n_out, n_in, device=W.device, dtype=dtype)
    narrow = dtype if dtype.itemsize < W.dtype.itemsize else W.dtype
    _bone_col_wprime_kernel[((n_out // b) * triton.cdiv(b, bb), n_in // b)](
        W, B, Wp, n_in, b, BLOCK_B=bb, DOT_F32=dot_f32, PREC=prec, DOT_DT=_TL_DTYPE[narrow])
    return Wp


def _bone_col_dB(G, W, B):
    """dB (out/b, b, b) in B's dtype from G = dL/dW' (out, in)."""
    n_out, n_in = W.shape
    b = B.shape[1]
    nbo, nbi = n_out // b, n_in // b
    bb = _bone_blocks(b)
    tiles = nbo * triton.cdiv(b, bb) ** 2
    split = max(1, min(nbi, triton.cdiv(_BONE_TARGET_PROGRAMS, tiles)))
    part = torch.empty(split, nbo, b, b, device=W.device, dtype=torch.float32)
    dot_f32, prec = _dot_flags(W)
    _bone_col_dB_kernel[(tiles, split)](G, W, part, n_in, nbo, nbi, b, split,
                                        BLOCK_B=bb, DOT_F32=dot_f32, PREC=prec)
    return part.sum(0).to(B.dtype)  # (out/b, b, b)


class BoneColLinearFunction(torch.autograd.Function):
    """y = x W'^T + bias: W' formed by the forward kernel, the products by cuBLAS (see above)."""

    @staticmethod
    def forward(ctx, x, W, B, bias):
        x2 = x.reshape(-1, x.shape[-1])  # (M, in), in the compute dtype (see bone_col_linear)
        W, B = W.contiguous(), B.contiguous()
        y = F.linear(x2, _bone_col_wprime(W, B, x.dtype), None if bias is None else bias.to(x.dtype))  # (M, out)
        ctx.save_for_backward(x2, W, B)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, W, B = ctx.saved_tensors
        g = gy.reshape(-1, W.shape[0]).to(x2.dtype)  # (M, out)
        dx = dB = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, _bone_col_wprime(W, B, x2.dtype)).view(*gy.shape[:-1], x2.shape[1])  # (..., in)
        if ctx.needs_input_grad[2]:
            dB = _bone_col_dB(torch.mm(g.t(), x2), W, B)  # G = g^T x: (out, in)
        if ctx.needs_input_grad[3]:
            dbias = g.float().sum(0).to(ctx.bias_dtype)  # (out,)
        return dx, None, dB, dbias


def bone_col_linear_reference(x, W, B, bias=None):
    """Plain PyTorch oracle: materialises W' (out, in) — for tests and benchmarks, not a training path."""
    nbo, b = B.shape[0], B.shape[1]
    Wb = W.reshape(nbo, b, -1, b)  # (out/b, b, in/b, b): W_ij[p, q] = Wb[i, p, j, q]
    WB = torch.einsum("ipjr,irq->ipjq", Wb, B)  # (out/b, b, in/b, b): W_ij B_i
    Wp = (Wb + WB + B[:, :, None, :]).reshape(W.shape)  # (out, in)
    return torch.nn.functional.linear(x, Wp, bias)


def bone_col_linear(x, W, B, bias=None):
    """Bone-col linear: x (..., in), frozen W (out, in), B (out/b, b, b) -> x W'^T + bias. Computed in x's
    dtype (autocast's when it is on), like nn.Linear; W' and dW' are transient, never saved."""
    n_out, n_in = W.shape
    if B.dim() != 3 or B.shape[1] != B.shape[2] or B.shape[0] * B.shape[1] != n_out or n_in % B.shape[1]:
        raise ValueError(f"bone_col_linear: need B (out/b, b, b) with b | in, b | out for W {tuple(W.shape)}, "
                         f"got {tuple(B.shape)}")
    if x.shape[-1] != n_in:
        raise ValueError(f"bone_col_linear: x has {x.shape[-1]} features, W expects in={n_in}")
    if W.requires_grad and torch.is_grad_enabled():
        raise ValueError("bone_col_linear: W must be frozen (requires_grad=False); its gradient is not computed")
    return BoneColLinearFunction.apply(_autocast_input(x), W, B, bias)


# -----------------------------------------------------------------------------------------------------
# Benchmark: python kernels.py [--device cuda|cpu] [--quick]


def _time_ms(fn, device, iters):
    """Median milliseconds per call: triton's do_bench on CUDA (L2 flushed between calls), else a
    perf_counter loop after warm-up."""
    if device.type == "cuda":
        if triton is not None:  # replayed as a CUDA graph: the GPU's time alone, not Python's launch overhead
            fn()
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def _op_cases(device, dtype, quick):
    """(name, shape text, kernel fn, reference fn, work, tensors whose .grad to clear) per op and pass.
    work is bytes (GB/s: the minimum traffic of a fused implementation, inputs read once, outputs written
    once) or ("flop", n) (TFLOP/s) and is the same for both columns, so the rates compare like with like."""
    N, D, r, s = (4096, 1024, 16, 8) if device.type == "cuda" else (256, 256, 16, 8)
    if quick:
        N //= 4
    es = torch.finfo(dtype).bits // 8
    mk = functools.partial(torch.randn, device=device, dtype=dtype)

    def no_grad(f, *args):
        def run():
            with torch.no_grad():
                f(*args)
        return run

    def fwd_bwd(f, g, *args):
        return lambda: torch.autograd.backward(f(*args), g)

    def fresh_y(f):  # the kernel writes into y: a detached alias keeps each call's graph off y itself
        return lambda y, *rest: f(y.detach(), *rest)

    cases = []
    for d_in, d_out in ((D, D), (D, 4 * D)):
        x, y, g = mk(N, d_in).requires_grad_(), mk(N, d_out), mk(N, d_out)
        A, B, d = (0.01 * mk(r, d_in)).requires_grad_(), (0.01 * mk(d_out, r)).requires_grad_(), \
            mk(r).requires_grad_()
        fwd = (N * d_in + 2 * N * d_out) * es  # read x, read + write y
        bwd = (N * d_out + 2 * N * d_in) * es  # read g, read x, write dx
        shape = f"N={N} {d_in}->{d_out} r={r}"
        lr = (y, x, A, B, d, 0.5)
        cases.append(("lowrank_add fwd", shape, no_grad(lowrank_add, *lr), no_grad(lowrank_add_reference, *lr),
                      fwd, []))
        cases.append(("lowrank_add fwd+bwd", shape, fwd_bwd(fresh_y(lowrank_add), g, *lr),
                      fwd_bwd(fresh_y(lowrank_add_reference), g, *lr), fwd + bwd, [x, A, B, d]))
        As, C, Bs = (0.1 * mk(s, d_in // s, 1)).requires_grad_(), (0.1 * mk(s, s)).requires_grad_(), \
            (0.1 * mk(s, 1, d_out // s)).requires_grad_()
        fwd_s = (N * d_in + N * d_out) * es  # read x, write out
        shape_s = f"N={N} {d_in}->{d_out} r=split={s}"
        sr = (x, As, C, Bs, 2.0)
        cases.append(("sera_delta fwd", shape_s, no_grad(sera_delta, *sr), no_grad(sera_delta_reference, *sr),
                      fwd_s, []))
        cases.append(("sera_delta fwd+bwd", shape_s, fwd_bwd(sera_delta, g, *sr),
                      fwd_bwd(sera_delta_reference, g, *sr), fwd_s + bwd, [x, As, C, Bs]))
    S, h, b, k = (65536, 256, 256, 2) if device.type == "cuda" else (4096, 256, 256, 2)
    logits, bank, gv = mk(S, h).requires_grad_(), (0.02 * mk(h, b)).requires_grad_(), mk(S, b)
    vb = (logits, bank, k)
    shape = f"S={S} h={h} b={b} k={k}"
    cases.append(("vblora_compose fwd", shape, no_grad(vblora_compose, *vb), no_grad(vblora_compose_reference, *vb),
                  (S * h + S * b) * es, []))
    cases.append(("vblora_compose fwd+bwd", shape, fwd_bwd(vblora_compose, gv, *vb),
                  fwd_bwd(vblora_compose_reference, gv, *vb), 2 * (S * h + S * b) * es, [logits, bank]))
    bb = 64
    x = mk(N, D).requires_grad_()
    Bb = (0.01 * mk(D // bb, bb, bb)).requires_grad_()
    shape = f"N={N} in={D} b={bb}"
    cases.append(("bone_row fwd", shape, no_grad(bone_row, x, Bb), no_grad(bone_row_reference, x, Bb),
                  (2 * N * D + N * bb) * es, []))
    cases.append(("bone_row fwd+bwd", shape, fwd_bwd(bone_row, (mk(N, D), mk(N, bb)), x, Bb),
                  fwd_bwd(bone_row_reference, (mk(N, D), mk(N, bb)), x, Bb), 2 * (2 * N * D + N * bb) * es, [x, Bb]))
    W, bias = mk(4 * D, D), mk(4 * D)
    Bc = (0.01 * mk(4 * D // bb, bb, bb)).requires_grad_()
    shape = f"N={N} {D}->{4 * D} b={bb}"
    flop = 2 * N * D * 4 * D
    bc = (x, W, Bc, bias)
    cases.append(("bone_col_linear fwd", shape, no_grad(bone_col_linear, *bc), no_grad(bone_col_linear_reference, *bc),
                  ("flop", flop), []))
    cases.append(("bone_col_linear fwd+bwd", shape, fwd_bwd(bone_col_linear, mk(N, 4 * D), *bc),
                  fwd_bwd(bone_col_linear_reference, mk(N, 4 * D), *bc), ("flop", 3 * flop), [x, Bc]))
    return cases


def _rate(work, ms):
    if isinstance(work, tuple):
        return f"{work[1] / ms / 1e9:.1f} TFLOP/s"
    return f"{work / ms / 1e6:.1f} GB/s"


def _bench_ops(device, dtype, quick):
    use_kernel = enabled(torch.empty(0, device=device, dtype=dtype))
    print(f"\n(1) ops vs their PyTorch reference ({device.type}, {str(dtype)[6:]}; "
          f"triton {'on' if use_kernel else 'off: reference only'})")
    print(f"{'op':<25}{'shape':<26}{'triton ms':>10}{'torch ms':>10}{'speedup':>9}{'triton rate':>17}"
          f"{'torch rate':>17}")
    iters = 5 if quick else 20
    for name, shape, kern, ref, work, grads in _op_cases(device, dtype, quick):
        def clear(fn):
            def run():
                fn()
                for t in grads:
                    t.grad = None
            return run
        t_ref = _time_ms(clear(ref), device, iters)
        line = f"{name:<25}{shape:<26}"
        if use_kernel:
            t_k = _time_ms(clear(kern), device, iters)
            line += f"{t_k:>10.3f}{t_ref:>10.3f}{t_ref / t_k:>8.2f}x{_rate(work, t_k):>17}"
        else:
            line += f"{'-':>10}{t_ref:>10.3f}{'-':>9}{'-':>17}"
        print(line + f"{_rate(work, t_ref):>17}")


class _BenchBlock(nn.Module):
    """A GPT-2 block with q, k, v, o as separate Linears (the papers' targets), pre-LN, GELU MLP."""

    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        Bt, T, C = x.shape
        h = self.ln_1(x)
        q, k, v = (m(h).view(Bt, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(Bt, T, C)  # (B, T, C)
        x = x + self.o(a)
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


_BENCH_TARGETS = ["q", "k", "v", "o", "fc", "proj"]


def _bench_methods():
    """(name, attach(model) -> None) for every method file that imports, plus PEFT's where installed."""
    import importlib
    out = []
    specs = [("lora", "apply_lora", "LoRAConfig", {}), ("lora p=0", "apply_lora", "LoRAConfig", {"dropout": 0.0}),
             ("sera", "apply_sera", "SeRAConfig", {}),
             ("siva", "apply_siva", "SiVAConfig", {}), ("bone-row", "apply_bone", "BoneConfig", {"grouping": "row"}),
             ("bone-col", "apply_bone", "BoneConfig", {"grouping": "col"}),
             ("vblora", "apply_vblora", "VBLoRAConfig", {})]
    for name, apply_name, cfg_name, kw in specs:
        try:
            mod = importlib.import_module(apply_name[len("apply_"):])
        except ImportError as e:
            print(f"  ({name}: not importable: {e})")
            continue
        out.append((name, lambda m, mod=mod, a=apply_name, c=cfg_name, kw=kw:
                    getattr(mod, a)(m, getattr(mod, c)(**kw), _BENCH_TARGETS)))
    try:
        import peft
    except ImportError:
        return out
    peft_cfgs = [("peft-lora", lambda: peft.LoraConfig(r=4, lora_alpha=32, lora_dropout=0.1,
                                                      target_modules=_BENCH_TARGETS)),
                 ("peft-vblora", lambda: peft.VBLoRAConfig(r=4, vector_length=256, num_vectors=256, topk=2,
                                                          target_modules=_BENCH_TARGETS)),
                 ("peft-miss-bat", lambda: peft.MissConfig(r=64, init_weights="bat", target_modules=_BENCH_TARGETS))]
    for name, cfg in peft_cfgs:
        out.append((name, lambda m, cfg=cfg: peft.get_peft_model(m, cfg())))
    return out


@contextlib.contextmanager
def _triton_off(off):
    """NANOPEFT_NO_TRITON=1 for the duration (read at every call, so a model's steps can take either path)."""
    old = os.environ.get("NANOPEFT_NO_TRITON")
    if off:
        os.environ["NANOPEFT_NO_TRITON"] = "1"
    try:
        yield
    finally:
        if off:
            if old is None:
                os.environ.pop("NANOPEFT_NO_TRITON")
            else:
                os.environ["NANOPEFT_NO_TRITON"] = old


def _capture(body, reset):
    """A CUDA graph of body() (forward, backward, optimizer step), warmed up on a side stream first (this also
    autotunes). Gradients are None at capture, so each replay writes them afresh, as a real step would."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
            reset()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


def _bench_steps(device, quick, only=None, modes=("eager", "graph")):
    """One training step (forward, backward, AdamW step on the trainable tensors) per method, over a stack of
    GPT-2-Medium-shaped blocks with every Linear adapted, divided by the same step of the frozen base model.
    The baseline's input activations require grad (a stand-in for an unfrozen embedding), so it, too,
    backpropagates through every layer; the adapted models get the same input.

    Two columns on CUDA. "eager" is a plain Python loop, what a training script sees: on a GPU this fast
    each layer's Python and launch overhead can exceed its GPU work, so it measures the host as much as the
    kernels. "graph" replays the whole step as one CUDA graph: no host overhead, the GPU cost alone, which
    is what the kernels decide. Rows "[torch]" run the same model with NANOPEFT_NO_TRITON=1.

    All models are built first and their steps interleaved round-robin, each time the median: a machine
    that slows down mid-run slows every method alike, so the ratios stay side by side. Peak memory (CUDA)
    is the model's own tensors plus the most its eager step allocates on top."""
    cuda = device.type == "cuda"
    if cuda:
        d, n_layer, Bt, T, iters = 1024, (2 if quick else 4), (4 if quick else 8), (256 if quick else 512), \
            (5 if quick else 20)
    else:
        d, n_layer, Bt, T, iters = (256 if quick else 512), 2, 4, (64 if quick else 128), (3 if quick else 9)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    print(f"\n(2) training step vs frozen base model ({device.type}: {n_layer} blocks d={d}, "
          f"batch {Bt}x{T}, {'bf16 autocast' if cuda else 'fp32'}; median of {iters} interleaved steps)")
    x = torch.randn(Bt, T, d, device=device, requires_grad=True)

    def build():
        torch.manual_seed(0)
        return nn.Sequential(*[_BenchBlock(d, d // 64) for _ in range(n_layer)]).to(device)

    def make(attach, off, graphed):
        """(step fn, trainable count, bytes of the model's own tensors) for one model."""
        model = build()
        if attach is None:
            model.requires_grad_(False)
        else:
            attach(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda, capturable=graphed) if params else None  # as the scripts

        def body():
            with amp:
                loss = model(x).float().square().mean()
            loss.backward()
            if opt is not None:
                opt.step()

        def reset():
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            x.grad = None

        with _triton_off(off):
            if graphed:
                replay = _capture(body, reset)

                def step(_keep=(model, opt)):  # the graph holds raw pointers: keep its tensors alive
                    replay()
            else:
                for _ in range(2):  # also autotunes, and creates AdamW's state
                    body()
                    reset()

                def step():
                    with _triton_off(off):
                        body()
                        reset()
                    if cuda:
                        torch.cuda.synchronize()
        state = [t for st in (opt.state.values() if opt else ()) for t in st.values() if torch.is_tensor(t)]
        own = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), *state])
        return step, sum(p.numel() for p in params), own

    specs = [("base (frozen)", None, False)]
    for name, attach in _bench_methods():
        if only and name not in only:
            continue
        specs.append((name, attach, False))
        if cuda and not name.startswith("peft"):
            specs.append((name + " [torch]", attach, True))

    def timed(graphed):
        runs = {}
        for name, attach, off in specs:
            try:
                runs[name] = make(attach, off, graphed)
            except Exception as e:  # one broken method must not hide the others' numbers
                runs[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
        times = {name: [] for name, r in runs.items() if not isinstance(r, str)}
        reps = 5 if graphed else 1
        for _ in range(iters):
            for name in times:
                step = runs[name][0]
                if graphed:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(reps):
                    step()
                if graphed:
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / reps)
        med = {name: sorted(t)[iters // 2] for name, t in times.items()}
        return runs, med

    eager, t_eager = timed(False) if "eager" in modes else ({n: "skipped" for n, _, _ in specs}, {})
    peaks = {}
    for name, run in eager.items():
        if cuda and not isinstance(run, str):  # this model's tensors + the most one step allocates beyond that
            step, _, own = run
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            peaks[name] = (own + torch.cuda.max_memory_allocated() - before) / 2 ** 30
    eager = {name: (r if isinstance(r, str) else r[1]) for name, r in eager.items()}  # free the models
    graph, t_graph = timed(True) if cuda and "graph" in modes else ({}, {})
    print(f"{'method':<22}{'eager ms':>10}{'x base':>8}{'graph ms':>10}{'x base':>8}{'peak GiB':>10}{'trainable':>12}")
    for name, _, _ in specs:
        line = f"{name:<22}"
        for run, t in ((eager, t_eager), (graph, t_graph)):
            if name in t:
                line += f"{1e3 * t[name]:>10.2f}{t[name] / t['base (frozen)']:>8.2f}"
            elif isinstance(run.get(name), str) and run[name] != "skipped":
                line += f"  failed ({run[name]})"
            else:
                line += f"{'-':>10}{'-':>8}"
        count = eager[name] if not isinstance(eager[name], str) else None
        line += f"{peaks[name]:>10.2f}" if name in peaks else f"{'-':>10}"
        print(line + (f"{count:>12,}" if count is not None else ""))


def main():
    p = argparse.ArgumentParser(description="Benchmark the Triton kernels and one training step per method.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    p.add_argument("--methods", default="", help="comma-separated step rows to run (default: all), e.g. lora,vblora")
    p.add_argument("--steps", default="eager,graph", help="step timings to take: eager, graph (CUDA) or both")
    p.add_argument("--no-ops", action="store_true", help="skip the op table")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, triton {triton.__version__ if triton is not None else 'not installed'}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    if device.type == "cpu":
        # one thread: on a shared or busy machine torch's thread pool turns small ops into barrier waits
        # that swamp the differences being measured; base and methods run alike, so ratios stay fair
        torch.set_num_threads(1)
        if _interpreting():
            print("note: TRITON_INTERPRET=1 runs the kernels in the (slow) interpreter; their times mean nothing")
    torch.manual_seed(0)
    if not args.no_ops:
        _bench_ops(device, torch.bfloat16 if device.type == "cuda" else torch.float32, args.quick)
    _bench_steps(device, args.quick, [m for m in args.methods.split(",") if m], args.steps.split(","))


if __name__ == "__main__":
    main()
