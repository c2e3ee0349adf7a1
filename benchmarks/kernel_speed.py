"""Time and peak memory of the fused kernels against their reference implementations.

    python benchmarks/kernel_speed.py                      # CPU: the fused torch paths
    python benchmarks/kernel_speed.py --device cuda        # GPU: Triton / flash paths too
    python benchmarks/kernel_speed.py --check              # exit 1 unless fused CE meets its targets

Targets: fused linear + cross-entropy at 8k tokens x 32k vocab uses at most 25% of the
reference's (full-logits) peak memory and at most 1.1x its time (forward + backward).

Measurement:
- time: forward + backward, best of ``--repeats`` runs after one warm-up (best-of-n is the least
  noisy estimator on a shared machine); the cases of one op are interleaved run by run so a slow
  phase of the machine hits all of them. Wall time and process CPU time (all threads) are both
  printed; on CPU the ratios use CPU time, because the CPU machines are shared and wall time
  there mostly measures the neighbours. On CUDA the ratios use wall time (synchronised).
- the targets are checked for the path "auto" picks on the device: triton on CUDA, fused on CPU.
- peak memory: the extra memory at the peak of one forward + backward, inputs excluded. CUDA:
  torch.cuda.max_memory_allocated. CPU: each case runs in a fresh child process and reports
  ru_maxrss after the run minus the RSS before it (the whole process, allocator caching
  included: an upper bound on what the op needs, and the number the OS would kill you for).
- CPU default hidden size is 256 (not the model's 1024+) to keep a reference run short on
  two cores; the logits, which dominate memory, do not depend on it. Use --hidden to change it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_unihetero.kernels import (  # noqa: E402
    attention,
    fused_linear_cross_entropy,
    fused_regression_loss,
    swiglu_linear,
)
from megatron_unihetero.models.heads import SemanticHead  # noqa: E402


# ------------------------------------------------------------------------------------------ cases
# Each case builds its inputs and returns (step, description); step() runs forward + backward.

def _leaf(t):
    return t.requires_grad_()


def case_ce(args, impl, device, dtype):
    gen = torch.Generator(device).manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    hidden = _leaf(torch.randn(n, h, generator=gen, device=device).to(dtype))
    weight = _leaf((torch.randn(v, h, generator=gen, device=device) / h**0.5).to(dtype))
    labels = torch.randint(0, v, (n,), generator=gen, device=device)

    def step():
        hidden.grad = weight.grad = None
        loss, count = fused_linear_cross_entropy(hidden, weight, labels, impl=impl)
        (loss / count).backward()

    return step, f"N={n} H={h} V={v} {str(dtype)[6:]}"


def case_attention(args, impl, device, dtype, packed=True):
    gen = torch.Generator(device).manual_seed(0)
    b, s, hq, hkv, d = args.attn_batch, args.attn_seq, 16, 4, 64
    q, k, v = (_leaf(torch.randn(b, s, h, d, generator=gen, device=device).to(dtype)) for h in (hq, hkv, hkv))
    seg = None
    if packed:  # documents of 1/2, 1/4, 1/8... of the row, last 5% padding
        ids = torch.zeros(s, dtype=torch.long)
        start, doc = 0, 0
        while start < s:
            length = max(1, (s - start) // 2)
            ids[start : start + length] = doc
            start, doc = start + length, doc + 1
        ids[int(s * 0.95):] = -1
        seg = ids.expand(b, s).contiguous().to(device)

    def step():
        q.grad = k.grad = v.grad = None
        out = attention(q, k, v, segment_ids=seg, impl=impl)
        out.float().square().mean().backward()

    return step, f"b={b} s={s} hq={hq} hkv={hkv} d={d} {'packed' if packed else 'causal'} {str(dtype)[6:]}"


def case_regression(args, impl, device, dtype):
    gen = torch.Generator(device).manual_seed(0)
    n, h, d = args.tokens, args.hidden, args.reg_dim
    hidden = _leaf(torch.randn(n, h, generator=gen, device=device).to(dtype))
    head = SemanticHead(h, d, "linear").to(device, dtype)
    target = torch.randn(n, d, generator=gen, device=device).to(dtype)

    def step():
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        fused_regression_loss(head, hidden, target, loss="mse", impl=impl).backward()

    return step, f"N={n} H={h} D={d} mse {str(dtype)[6:]}"


def case_swiglu(args, impl, device, dtype):
    """The MLP's fc1 + SwiGLU, at the tiny CPU config's width by default: megatron's fused GEMM,
    chunk and silu * up ("reference") against the two-GEMM autograd function ("fused")."""
    gen = torch.Generator(device).manual_seed(0)
    n, h, f = args.tokens, args.hidden, args.ffn
    x = _leaf(torch.randn(n, h, generator=gen, device=device).to(dtype))
    weight = _leaf((torch.randn(2 * f, h, generator=gen, device=device) / h**0.5).to(dtype))

    def step():
        x.grad = weight.grad = None
        swiglu_linear(x, weight, impl=impl).float().square().mean().backward()

    return step, f"N={n} H={h} F={f} {str(dtype)[6:]}"


def plan(device):
    """(op, impl, builder, extra kwargs); the first impl of each op is its baseline."""
    cuda = device == "cuda"
    rows = [("linear+CE", "reference", case_ce, {}), ("linear+CE", "fused", case_ce, {})]
    if cuda:
        rows.append(("linear+CE", "triton", case_ce, {}))
    rows += [("regression", "reference", case_regression, {}), ("regression", "fused", case_regression, {})]
    if cuda:
        rows.append(("regression", "triton", case_regression, {}))
    rows += [("attention", "reference", case_attention, {"packed": False}),
             ("attention", "reference", case_attention, {"packed": True})]
    if cuda:
        rows += [("attention", "flex", case_attention, {"packed": True}),
                 ("attention", "auto", case_attention, {"packed": True})]
    rows += [("swiglu", "reference", case_swiglu, {}), ("swiglu", "fused", case_swiglu, {})]
    return rows


# ------------------------------------------------------------------------------------ measuring

def _rss_bytes():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args, index, repeats):
    """Run plan()[index]: peak extra memory of the first (cold) run, then ``repeats`` timings."""
    op, impl, builder, kw = plan(args.device)[index]
    dtype = torch.bfloat16 if (args.device == "cuda" and args.bf16) else torch.float32
    step, shape = builder(args, impl, args.device, dtype, **kw)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is KiB
    times, cpu_times = [], []
    for _ in range(repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return dict(op=op, impl=impl + ("" if kw.get("packed", True) else " (no segments)"), shape=shape,
                peak_mib=peak / 2**20, times=times, cpu_times=cpu_times)


def run_child(args, index, repeats):
    """CPU: a fresh process per measurement, so one case's freed-but-cached memory cannot hide
    another's peak."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", str(index), "--_repeats", str(repeats)]
    cmd += [f"--{k}={v}" for k, v in vars(args).items() if not k.startswith("_") and k not in ("check",)
            and not isinstance(v, bool)]
    cmd += [f"--{k}" for k, v in vars(args).items() if isinstance(v, bool) and v and k != "check"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"case {index} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=None, help="default 256 on CPU, 4096 on CUDA")
    parser.add_argument("--reg_dim", type=int, default=None, help="regression output dim (default = hidden)")
    parser.add_argument("--attn_batch", type=int, default=None)
    parser.add_argument("--attn_seq", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", default=None, help="bf16 inputs (CUDA default)")
    parser.add_argument("--ffn", type=int, default=None, help="SwiGLU width F (default 344 on CPU, 11008 on CUDA)")
    parser.add_argument("--only", default="", help="comma list of ops: linear+CE,regression,attention,swiglu")
    parser.add_argument("--check", action="store_true", help="exit 1 if the fused CE misses its targets")
    parser.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_repeats", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.hidden = args.hidden or (4096 if cuda else 256)
    args.reg_dim = args.reg_dim or args.hidden
    args.ffn = args.ffn or (11008 if cuda else 344)
    args.attn_batch = args.attn_batch or (4 if cuda else 1)
    args.attn_seq = args.attn_seq or (4096 if cuda else 1024)
    args.bf16 = cuda if args.bf16 is None else args.bf16
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    torch.manual_seed(0)

    if args._child is not None:
        print(json.dumps(measure(args, args._child, args._repeats)))
        return

    rows = plan(args.device)
    wanted = [i for i, r in enumerate(rows) if not args.only or r[0] in args.only.split(",")]
    results = {}
    if cuda:  # a dedicated device: one call per case (memory, warm-up, then the timed repeats)
        for i in wanted:
            results[i] = measure(args, i, args.repeats)
    else:  # memory + warm-up pass, then timing passes interleaved across cases, each in a child
        for i in wanted:
            results[i] = run_child(args, i, 0)
        for _ in range(args.repeats):
            for i in wanted:
                r = run_child(args, i, 1)
                results[i]["times"] += r["times"]
                results[i]["cpu_times"] += r["cpu_times"]

    print(f"\ndevice={args.device} ({torch.cuda.get_device_name() if cuda else f'{os.cpu_count()} cpus'}), "
          f"best of {args.repeats}, forward+backward, peak = extra memory at peak, inputs excluded")
    if not cuda:
        print("time ratios ('x base') use process CPU time: on a shared CPU machine wall time mostly "
              f"measures the neighbours (load average now {os.getloadavg()[0]:.1f})")
    header = (f"{'op':<11} {'impl':<20} {'shape':<44} {'wall ms':>9} {'cpu ms':>9} {'x base':>7} "
              f"{'peak MiB':>9} {'x base':>7}")
    print(header)
    print("-" * len(header))
    base = {}
    verdict = True
    for i in wanted:
        r = results[i]
        best, best_cpu = min(r["times"]) * 1e3, min(r["cpu_times"]) * 1e3
        key = best if cuda else best_cpu
        base.setdefault(r["op"], (key, r["peak_mib"]))
        t_ratio, m_ratio = key / base[r["op"]][0], r["peak_mib"] / max(base[r["op"]][1], 1e-9)
        print(f"{r['op']:<11} {r['impl']:<20} {r['shape']:<44} {best:9.1f} {best_cpu:9.1f} {t_ratio:7.2f} "
              f"{r['peak_mib']:9.1f} {m_ratio:7.2f}")
        if r["op"] == "linear+CE" and r["impl"] == ("triton" if cuda else "fused"):
            ok = t_ratio <= 1.1 and m_ratio <= 0.25
            verdict &= ok
            print(f"{'':<11} -> target (<=1.10x time, <=0.25x memory of reference): {'MET' if ok else 'MISSED'}")
    if args.check and not verdict:
        sys.exit(1)


if __name__ == "__main__":
    main()
