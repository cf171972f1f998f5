"""Benchmark: each Triton kernel against its reference, and one training step per method against the
frozen base model.

    python bench.py                       # CUDA if present, else CPU
    python bench.py --device cpu          # the CPU table only (about 1-2 minutes on 2 cores)
    python bench.py --quick --methods lora,vblora --steps graph

(1) Ops (CUDA only). Each public op of kernels.py against its plain-PyTorch reference, forward and
    forward+backward, timed as a CUDA graph (triton.testing.do_bench_cudagraph): GPU time alone.
(2) Steps. A stack of Llama-shaped blocks (RMSNorm, attention with q, k, v, o of d x d, SwiGLU MLP with
    gate, up d -> f and down f -> d, f = 8d/3 rounded up to a multiple of 256; no RoPE, which costs every
    row alike) with all seven Linears adapted. One step = forward, backward, AdamW step on the trainable
    tensors; the frozen base model (no adapter) takes the same step with its input requiring grad, so it,
    too, backpropagates through every layer. Every model is built first; then the steps are interleaved
    round-robin and each row reports its median, so a machine that slows down mid-run slows every row
    alike. Ratios are to the frozen model.
    CPU: 6 blocks, d = 768 (f = 2048), batch 4 x 128 tokens, fp32, 2 threads; the method files run their
    own formulas (no kernel applies on a CPU). LoRA runs with dropout 0 (its mask is one more pass over x
    that the GPU kernels draw in registers; p = 0 measures the adapter's products alone).
    CUDA: 4 blocks, d = 1024, batch 8 x 512, bf16 autocast. Two columns: "eager" is a plain Python loop,
    what a training script sees; on a fast GPU each layer's Python and launch overhead (a Triton launch
    costs 16-50 us of host time, a torch op 10-20 us) can exceed its GPU work, so eager measures the host
    as much as the kernels. "graph" replays the whole step as one CUDA graph: no host overhead, the GPU
    cost alone, which is what the kernels decide. "[torch]" rows run the same model with
    NANOPEFT_NO_TRITON=1 (the method files' formulas); peft-* rows appear when `peft` imports (else a
    note says why they are missing).
    Peak memory (CUDA) is the model's own tensors plus the most one eager step allocates on top.
"""
import argparse
import contextlib
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bone
import lora
import sera
import siva
import vblora

try:
    import triton
except ImportError:
    triton = None
try:
    import kernels
except ImportError:
    kernels = None

TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]


# -----------------------------------------------------------------------------------------------------
# (1) each op against its reference (CUDA)

def op_cases(device, quick):
    """(name, shape text, kernel fn, reference fn, tensors whose .grad to clear), forward and fwd+bwd."""
    N, D, r, s = (1024 if quick else 4096), 1024, 16, 8
    mk = lambda *shape: torch.randn(*shape, device=device, dtype=torch.bfloat16)
    leaf = lambda t: t.requires_grad_()

    def no_grad(f, *args):
        def run():
            with torch.no_grad():
                f(*args)
        return run

    def fwd_bwd(f, g, *args):
        return lambda: torch.autograd.backward(f(*args), g)

    cases = []

    def add(name, shape, op, ref, args, g, grads):
        cases.append((f"{name} fwd", shape, no_grad(op, *args), no_grad(ref, *args), []))
        cases.append((f"{name} fwd+bwd", shape, fwd_bwd(op, g, *args), fwd_bwd(ref, g, *args), grads))

    for d_in, d_out in ((D, D), (D, 4 * D)):
        x, W, bias, g = leaf(mk(N, d_in)), mk(d_out, d_in), mk(d_out), mk(N, d_out)
        A, B, d = leaf(0.01 * mk(r, d_in)), leaf(0.01 * mk(d_out, r)), leaf(mk(r))
        add("lowrank_linear", f"N={N} {d_in}->{d_out} r={r}", kernels.lowrank_linear,
            kernels.lowrank_linear_reference, (x, W, bias, A, B, d, 0.5), g, [x, A, B, d])
        As, C, Bs = leaf(0.1 * mk(s, d_in // s, 1)), leaf(0.1 * mk(s, s)), leaf(0.1 * mk(s, 1, d_out // s))
        add("sera_delta", f"N={N} {d_in}->{d_out} r=split={s}", kernels.sera_delta,
            kernels.sera_delta_reference, (x, As, C, Bs, 2.0), g, [x, As, C, Bs])
    S, h, b, k = (16384 if quick else 65536), 256, 256, 2
    logits, bank = leaf(mk(S, h)), leaf(0.02 * mk(h, b))
    add("vblora_compose", f"S={S} h={h} b={b} k={k}", lambda *a: kernels.vblora_compose(*a, k),
        lambda *a: kernels.vblora_compose_reference(*a, k), (logits, bank), mk(S, b), [logits, bank])
    bb, x = 64, leaf(mk(N, D))
    Bb = leaf(0.01 * mk(D // bb, bb, bb))
    add("bone_row", f"N={N} in={D} b={bb}", kernels.bone_row, kernels.bone_row_reference, (x, Bb),
        (mk(N, D), mk(N, bb)), [x, Bb])
    W, bias, Bc = mk(4 * D, D), mk(4 * D), leaf(0.01 * mk(4 * D // bb, bb, bb))
    add("bone_col_linear", f"N={N} {D}->{4 * D} b={bb}", kernels.bone_col_linear,
        kernels.bone_col_linear_reference, (x, W, Bc, bias), mk(N, 4 * D), [x, Bc])
    return cases


def bench_ops(device, quick):
    print("\n(1) ops vs their PyTorch reference")
    if device.type != "cuda" or kernels is None:
        print("    skipped: the kernels run on CUDA (TRITON_INTERPRET=1 is for tests, its times mean nothing)")
        return
    print(f"{'op':<26}{'shape':<26}{'triton ms':>10}{'torch ms':>10}{'speedup':>9}")
    for name, shape, kern, ref, grads in op_cases(device, quick):
        def timed(fn):
            def run():
                fn()
                for t in grads:
                    t.grad = None
            run()  # warm-up (compiles, autotunes)
            return triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median")
        t_k, t_r = timed(kern), timed(ref)
        print(f"{name:<26}{shape:<26}{t_k:>10.3f}{t_r:>10.3f}{t_r / t_k:>8.2f}x")


# -----------------------------------------------------------------------------------------------------
# (2) one training step per method against the frozen base model

class Block(nn.Module):
    """A Llama-shaped block: pre-RMSNorm, causal attention (q, k, v, o), SwiGLU MLP (gate, up, down)."""

    def __init__(self, d, n_head):
        super().__init__()
        f = 256 * -(-(8 * d // 3) // 256)  # Llama's hidden size: 8d/3 rounded up to a multiple of 256
        self.n_head = n_head
        self.norm_1, self.norm_2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False), \
            nn.Linear(f, d, bias=False)

    def forward(self, x):
        Bt, T, C = x.shape
        h = self.norm_1(x)
        q, k, v = (m(h).view(Bt, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for m in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(Bt, T, C)  # (B, T, C)
        x = x + self.o(a)
        h = self.norm_2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def methods():
    """(row name, attach(model)) for every method, plus PEFT's where installed."""
    rows = [("lora", lambda m: lora.apply_lora(m, lora.LoRAConfig(dropout=0.0), TARGETS)),
            ("vblora", lambda m: vblora.apply_vblora(m, vblora.VBLoRAConfig(), TARGETS)),
            ("siva", lambda m: siva.apply_siva(m, siva.SiVAConfig(), TARGETS)),
            ("sera", lambda m: sera.apply_sera(m, sera.SeRAConfig(), TARGETS)),
            ("bone-row", lambda m: bone.apply_bone(m, bone.BoneConfig(grouping="row"), TARGETS)),
            ("bone-col", lambda m: bone.apply_bone(m, bone.BoneConfig(grouping="col"), TARGETS))]
    try:
        import peft
    except Exception as e:  # not installed, or broken by a module it imports (README: the name `kernels`)
        print(f"note: no peft-* rows: `import peft` failed ({type(e).__name__}: {e})")
        return rows
    for name, cfg in [("peft-lora", lambda: peft.LoraConfig(r=4, lora_alpha=32, lora_dropout=0.0,
                                                            target_modules=TARGETS)),
                      ("peft-vblora", lambda: peft.VBLoRAConfig(r=4, vector_length=256, num_vectors=256, topk=2,
                                                               target_modules=TARGETS))]:
        rows.append((name, lambda m, cfg=cfg: peft.get_peft_model(m, cfg())))
    return rows


@contextlib.contextmanager
def formulas_only(on):
    """NANOPEFT_NO_TRITON=1 while on: the method files read it at every call, so steps can take either path."""
    old = os.environ.get("NANOPEFT_NO_TRITON")
    if on:
        os.environ["NANOPEFT_NO_TRITON"] = "1"
    try:
        yield
    finally:
        if on:
            os.environ.pop("NANOPEFT_NO_TRITON") if old is None else os.environ.update(NANOPEFT_NO_TRITON=old)


def capture(body, reset):
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


def bench_steps(device, quick, only, modes):
    cuda = device.type == "cuda"
    if cuda:
        d, n_layer, Bt, T, iters = 1024, (2 if quick else 4), (4 if quick else 8), (256 if quick else 512), \
            (5 if quick else 20)
    else:
        d, n_layer, Bt, T, iters = 768, (2 if quick else 6), 4, 128, (3 if quick else 7)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    print(f"\n(2) training step vs the frozen base model ({device.type}: {n_layer} Llama-shaped blocks d={d}, "
          f"batch {Bt}x{T}, {'bf16 autocast' if cuda else f'fp32, {torch.get_num_threads()} threads'}; "
          f"median of {iters} interleaved steps)")
    x = torch.randn(Bt, T, d, device=device, requires_grad=True)

    def make(attach, off, graphed):
        """(step fn, trainable count, bytes of the model's own tensors) for one model."""
        torch.manual_seed(0)
        model = nn.Sequential(*[Block(d, d // 64) for _ in range(n_layer)]).to(device)
        if attach is None:
            model.requires_grad_(False)
        else:
            attach(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda, capturable=graphed) if params else None

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

        with formulas_only(off):
            if graphed:
                replay = capture(body, reset)

                def step(_keep=(model, opt)):  # the graph holds raw pointers: keep its tensors alive
                    replay()
            else:
                body()  # warm-up: compiles, autotunes, creates AdamW's state
                reset()

                def step():
                    with formulas_only(off):
                        body()
                        reset()
                    if cuda:
                        torch.cuda.synchronize()
        state = [t for st in (opt.state.values() if opt else ()) for t in st.values() if torch.is_tensor(t)]
        own = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), *state])
        return step, sum(p.numel() for p in params), own

    specs = [("base (frozen)", None, False)]
    for name, attach in methods():
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
                runs[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:70]}"
        times = {name: [] for name, r in runs.items() if not isinstance(r, str)}
        reps = 5 if graphed else 1
        for _ in range(iters):  # round-robin over the rows
            for name in times:
                if graphed:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(reps):
                    runs[name][0]()
                if graphed:
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / reps)
        return runs, {name: sorted(t)[iters // 2] for name, t in times.items()}

    eager, t_eager = timed(False) if "eager" in modes else ({n: "skipped" for n, _, _ in specs}, {})
    peaks = {}
    for name, run in eager.items():
        if cuda and not isinstance(run, str):
            step, _, own = run
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            peaks[name] = (own + torch.cuda.max_memory_allocated() - before) / 2 ** 30
    counts = {name: (r if isinstance(r, str) else r[1]) for name, r in eager.items()}  # frees the models
    graph, t_graph = timed(True) if cuda and "graph" in modes else ({}, {})
    print(f"{'method':<22}{'eager ms':>10}{'x base':>8}{'graph ms':>10}{'x base':>8}{'peak GiB':>10}{'trainable':>12}")
    base = "base (frozen)"
    for name, _, _ in specs:
        line = f"{name:<22}"
        for run, t in ((counts, t_eager), (graph, t_graph)):
            if name in t and base in t:
                line += f"{1e3 * t[name]:>10.2f}{t[name] / t[base]:>8.2f}"
            elif isinstance(run.get(name), str) and run[name] != "skipped":
                line += f"  failed ({run[name]})"
            else:
                line += f"{'-':>10}{'-':>8}"
        line += f"{peaks[name]:>10.2f}" if name in peaks else f"{'-':>10}"
        print(line + (f"{counts[name]:>12,}" if not isinstance(counts[name], str) else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer repetitions")
    p.add_argument("--methods", default="", help="comma-separated step rows (default: all), e.g. lora,vblora")
    p.add_argument("--steps", default="eager,graph", help="step timings on CUDA: eager, graph or both")
    p.add_argument("--no-ops", action="store_true", help="skip the op table")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    print(f"torch {torch.__version__}, triton {triton.__version__ if triton else 'not installed'}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    torch.manual_seed(0)
    if not args.no_ops:
        bench_ops(device, args.quick)
    bench_steps(device, args.quick, [m for m in args.methods.split(",") if m], args.steps.split(","))


if __name__ == "__main__":
    main()
