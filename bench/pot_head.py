"""Benchmark of the POT head (METHOD.md §3, steps 1-3): batched `pot.activation.pot_cams` against a straightforward
per-image, per-class loop of the same mathematics, side by side in one run; the head's time as a fraction of a
ResNet-50 forward+backward on the same device; the head's peak memory. Each is timed for the features laid out
channels-last (what `pot.train` feeds the head: the network runs channels-last) and channel by channel (NCHW).

    python bench/pot_head.py                      # CPU: batch 16, 3 classes + background, K=3, D=768, 32x32 grid
    python bench/pot_head.py --device cuda        # the same on a GPU
    python bench/pot_head.py --classes 20 --present 3   # VOC-like: 20 classes, 3 present per image

Times are medians over `--reps` calls after one warm-up call, wall clock (and process CPU time on CPU, which is less
sensitive to other jobs sharing the cores). On CPU torch runs with `--threads` threads (default 1: on a shared
machine OpenMP threads that spin-wait for a busy core can make 2-thread runs many times slower).
`malloc` keeps freed memory for reuse (`pot.core.keep_freed_memory`), as in every stage of the pipeline, for both
(a) and (b); `POT_MALLOC=default python bench/pot_head.py` measures with glibc's default instead.
Peak memory: CPU = rise of the peak resident set size (VmHWM, reset through /proc/self/clear_refs) over the resident
size just before the head, measured in a fresh child process (inputs already allocated, so not counted); CUDA =
torch.cuda.max_memory_allocated() over memory_allocated() just before the head.

The GPU path (`pot.activation.POTHead`: `pot_cams(sync=False)`, static shapes, no host synchronisation) is timed in
the same run, eager and compiled (`torch.compile(fullgraph=True)`, compile time reported apart), with the number of
top-level tensor operations per call, the host synchronisations (`aten::_local_scalar_dense`: every `.item()`,
`bool()`, `int()` of a tensor) and, on CUDA, the kernels launched, all counted with `torch.profiler`:

    python bench/pot_head.py --no-loop --no-resnet --layouts channels-last     # just the head paths, CPU
    python bench/pot_head.py --device cuda --json head.json                    # GPU: + ResNet-50 at 512x512, bf16
    python bench/pot_head.py --tiny                                            # seconds: tiny sizes (CI smoke test)

On CUDA the ResNet-50 step defaults to batch 16, 512x512 under bfloat16 autocast (what training runs) and the head's
share of the step is printed for each path.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as Fn

from pot.activation import pot_cams, POTHead
from pot.core import keep_freed_memory
from pot.cluster import normalize_with_background, kmeans_uniforms
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import synthetic_feature_maps          # a toy batch with a known answer


# ---------------------------------------------------------------------------------------------------------------
# (b) the same mathematics, written the straightforward way: loops over images, classes and clusters
# ---------------------------------------------------------------------------------------------------------------
def loop_kmeans(Xc, K, u, max_iter=30, tol=1e-4, dup_tol=1e-6):
    "Spherical k-means of the columns of Xc (D, n): k-means++ from uniforms u (K,), Lloyd, empty-cluster re-seeding."
    D, n = Xc.shape
    mu = Xc.new_zeros(K, D); valid = torch.zeros(K, dtype=torch.bool, device=Xc.device)
    w, maxsim = Xc.new_ones(n), Xc.new_full((n,), -2.0)
    for k in range(K):
        total = w.sum()
        if total <= 0: break
        i = int(torch.searchsorted(w.cumsum(0), (u[k] * total).reshape(1), right=True).clamp_max(n - 1))
        if w[i] <= 0: i = int(w.argmax())
        mu[k], valid[k] = Xc[:, i], True
        maxsim = torch.maximum(maxsim, mu[k] @ Xc)
        d = (1 - maxsim).clamp_min(0)
        w = torch.where(d > dup_tol, d, torch.zeros_like(d))
    assign = torch.full((n,), -1, dtype=torch.long, device=Xc.device)
    sums = Xc.new_zeros(K, D)
    for it in range(max_iter):
        best, new = (mu @ Xc).masked_fill(~valid[:, None], -3.0).max(0)
        counts = torch.stack([(new == k).sum() for k in range(K)])
        empty = [k for k in range(K) if valid[k] and counts[k] == 0]
        if empty:
            dist = torch.where(counts[new] >= 2, 1 - best, torch.full_like(best, -1.0))
            order = torch.sort(dist, descending=True, stable=True).indices
            for j, k in enumerate(empty):
                if dist[order[j]] > dup_tol: new[order[j]] = k
            counts = torch.stack([(new == k).sum() for k in range(K)])
        sums = torch.stack([Xc[:, new == k].sum(1) for k in range(K)])
        valid = valid & (counts > 0)
        mu_new = Fn.normalize(sums, dim=-1) * valid[:, None]
        shift = float((1 - (mu_new * mu).sum(-1)).masked_fill(~valid, 0).max())
        changed = bool((new != assign).any())
        mu, assign = mu_new, new
        if not changed or shift < tol: break
    return mu, sums, valid


def loop_sinkhorn(cost, b, eps, rho, n_iter=100, tol=1e-3):
    "One image's semi-relaxed (or balanced) log-domain Sinkhorn with torch.logsumexp; cost (M, P), b (P,)."
    M = cost.shape[0]
    phi = 1.0 if rho is None else rho / (rho + eps)
    loga, logb, Cs = cost.new_full((M,), -math.log(M)), b.log(), cost / eps
    be = torch.zeros_like(b)
    al = loga - torch.logsumexp(be[None] - Cs, 1)
    T = torch.exp(al[:, None] + be[None] - Cs)
    for _ in range(n_iter):
        be = phi * (logb - torch.logsumexp(al[:, None] - Cs, 0))
        al = loga - torch.logsumexp(be[None] - Cs, 1)
        Tn = torch.exp(al[:, None] + be[None] - Cs)
        err, T = float((Tn - T).abs().sum()) * M, Tn       # L1 change of Q = M·T (METHOD.md §3)
        if err < tol: break
    return T


def loop_pot_cams(F, S, labels, tau=0.7, K=3, eps=0.1, rho=0.1, t=0.1, u=None, kmeans_iter=30, sinkhorn_iter=100):
    "POT steps 1-3 one image and one class at a time; returns the CAM (N, C+1, h, w) like pot_cams(...).cam."
    N, D, h, w = F.shape; M, C = h * w, labels.shape[1]
    cams = []
    for n in range(N):
        X = F[n].flatten(1)
        Xd = X.detach()
        classes = [0] + [c + 1 for c in range(C) if labels[n, c] > 0.5]
        mus, nus, valids = [], [], []
        for c in classes:
            s = S[n, c].flatten()
            conf = (s >= tau) & (s > 0)
            if int(conf.sum()) < K:
                top = torch.sort(s, descending=True, stable=True).indices[:K]
                conf = torch.zeros_like(conf); conf[top[s[top] > 0]] = True
            idx = conf.nonzero()[:, 0]
            if len(idx) == 0:
                mu, sums, valid = Xd.new_zeros(K, D), Xd.new_zeros(K, D), torch.zeros(K, dtype=torch.bool, device=Xd.device)
            else:
                mu, sums, valid = loop_kmeans(Xd[:, idx], K, u[n, c].to(Xd.device, Xd.dtype), max_iter=kmeans_iter)
            mus.append(mu); nus.append(Fn.normalize(sums.sum(0), dim=0)); valids.append(valid)
        s = S[n, classes].flatten(1)
        win = (s == s.max(0).values).float()
        pi = (win / win.sum(0)).mean(1)
        active = torch.stack([v.any() for v in valids])
        pi = torch.where(active, pi.clamp_min(K / M), torch.zeros_like(pi)); pi = pi / pi.sum()
        b = []
        for i in range(len(classes)):
            logits = (mus[i] @ nus[i] / t).masked_fill(~valids[i], -math.inf)
            b.append(pi[i] * torch.softmax(logits, 0).nan_to_num(0.0))
        mu_all, b = torch.cat(mus), torch.cat(b)
        T = loop_sinkhorn(1 - Xd.T @ mu_all.T, b, eps, rho, n_iter=sinkhorn_iter)
        Q = T * M
        cam = X.new_zeros(C + 1, M)
        for i, c in enumerate(classes[1:], start=1):
            for k in range(K):
                j = i * K + k
                mu_new = Fn.normalize(Q[:, j] @ Xd.T, dim=0)
                cam[c] = cam[c] + Q[:, j] * (mu_new @ X).clamp_min(0)
        fg = cam[1:] / cam[1:].amax(1, keepdim=True).clamp_min(0.1)
        cams.append(torch.cat([1 - fg.amax(0, keepdim=True), fg]).view(C + 1, h, w))
    return torch.stack(cams)


# ---------------------------------------------------------------------------------------------------------------
def make_inputs(args, device):
    d = synthetic_feature_maps(N=args.batch, C=args.classes, size=args.grid, D=args.D, n_present=(args.present, args.present),
                               noise=args.noise, seed=0)
    S = normalize_with_background(d["seeds"], d["labels"])
    return d["F"].to(device), S.to(device), d["labels"].to(device)


def timed(fn, device, reps):
    "Median wall and CPU milliseconds of `fn()` over `reps` calls after one warm-up."
    def sync():
        if device.type == "cuda": torch.cuda.synchronize()
    fn(); sync()
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn(); sync()
        wall.append(1e3 * (time.perf_counter() - t0)); cpu.append(1e3 * (time.process_time() - c0))
    return statistics.median(wall), statistics.median(cpu)


def head_memory(args):
    "Child mode: peak memory of one forward+backward of the head (MiB), printed as JSON."
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    F, S, labels = make_inputs(args, device)     # glibc's default malloc here: kept freed memory would hide the peak
    F.requires_grad_(True)
    def run():
        out = pot_cams(F, S, labels, K=args.K)
        out.cam.sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated(); run(); torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key): return int(line.split()[1]) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f: f.write("5")       # reset VmHWM to the current RSS
        except OSError:
            print(json.dumps(dict(peak_mib=float("nan")))); return          # no way to reset the peak here
        base = status("VmRSS:"); run(); peak = status("VmHWM:") - base
    print(json.dumps(dict(peak_mib=peak / 2**20)))


def resnet_step_ms(device, batch, size, reps, amp=False):
    import torchvision
    net = torchvision.models.resnet50(weights=None).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    def step():
        net.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = Fn.cross_entropy(net(x), y)
        loss.backward()
    return timed(step, device, reps)


# ---------------------------------------------------------------------------------------------------------------
# the GPU path: static shapes, no host synchronisation, eager and compiled
# ---------------------------------------------------------------------------------------------------------------
_WRAPPERS = ("Torch-Compiled Region", "CompiledFunction", "## Call CompiledFxGraph", "TorchDynamo Cache Lookup")


def op_counts(fn, device) -> dict:
    "Per call of fn(): top-level tensor operations (outermost aten ops and compiled kernels), host syncs, CUDA kernels."
    from torch.profiler import profile, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda": torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    ops = 0
    def visit(e):
        nonlocal ops
        name = e.name
        if name.startswith("aten::") or "fused" in name or name.startswith(("cpp_", "triton_")): ops += 1; return
        for c in e.cpu_children: visit(c)
    for e in events:
        if e.cpu_parent is None: visit(e)
    syncs = sum(e.name == "aten::_local_scalar_dense" for e in events)
    out = dict(ops=ops, host_syncs=syncs)
    if device.type == "cuda":
        out["cuda_kernels"] = sum(e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
                                  for e in events)
        out["cuda_graph_launches"] = sum(e.name == "cudaGraphLaunch" for e in events)
    return out


# the GPU-path variants `--static` can name: POTHead's arguments
STATIC = {"eager-all": ("static eager, all C+1 slots", dict(compile=False, slots=None)),
          "eager": ("static eager", dict(compile=False)),
          "eager-check8": ("static eager, check_every=8", dict(compile=False, check_every=8)),
          "compiled-all": ("static compiled, all C+1 slots", dict(compile=True, slots=None)),
          "compiled": ("static compiled", dict(compile=True)),
          "compiled-check8": ("static compiled, check_every=8", dict(compile=True, check_every=8)),
          "cudagraphs": ("static compiled, CUDA graphs", dict(compile=True, mode="reduce-overhead")),
          "cudagraphs-check8": ("static compiled, check_every=8, CUDA graphs", dict(compile=True, check_every=8, mode="reduce-overhead"))}


def _fail_here(variant):
    "Raise if POT_BENCH_FAIL names `pot-head` or `pot-head:<part of this variant's name>` (the test of partial results)."
    for item in filter(None, os.environ.get("POT_BENCH_FAIL", "").split(",")):
        sec, _, var = item.partition(":")
        if sec == "pot-head" and var and var in variant: raise RuntimeError(f"POT_BENCH_FAIL={item}: failing on purpose")


def static_paths(args, device, F, S, labels, kw, res=None, save=lambda: None) -> dict:
    "The POTHead variants `args.static` (the GPU path) on the same inputs: times, compile time, op counts, agreement; `save()` after each."
    if device.type == "cpu":
        import torch._inductor.config as ic
        ic.cpp.enable_kernel_profile = True               # compiled C++ kernels show up in the profiler, to be counted
    res = {} if res is None else res
    names = [v for v in args.static.split(",") if v]
    if args.no_compile: names = [v for v in names if not STATIC[v][1]["compile"]]
    if device.type != "cuda": names = [v for v in names if "cudagraphs" not in v]
    heads = {}
    for v in names:
        label, hkw = STATIC[v]
        if hkw["compile"] and args.compile_mode and "mode" not in hkw: hkw = dict(hkw, mode=args.compile_mode)
        heads[label] = POTHead(**hkw)
    Fg = F.clone().requires_grad_(True)
    host = labels.cpu()
    def call(h):
        if "CUDA graphs" in next(k for k, v in heads.items() if v is h): torch.compiler.cudagraph_mark_step_begin()
        return h(Fg, S, labels, host_labels=host, **kw)
    def fwd(h): return lambda: call(h)                     # with grad enabled: the training graph, no recompile
    def fwd_bwd(h):
        def run():
            Fg.grad = None
            call(h).cam.sum().backward()
        return run
    ref = None
    for name, h in heads.items():
        r = res[name] = {}
        try:
            _fail_here(name)
            t0 = time.perf_counter()
            fwd_bwd(h)()                                      # compiles forward and backward (first call)
            if device.type == "cuda": torch.cuda.synchronize()
            r["first_call_s"] = time.perf_counter() - t0
            r["forward"] = timed(fwd(h), device, args.reps)
            out = call(h)
            r["n_iter_kmeans"], r["n_iter_sinkhorn"] = int(out.n_iter_kmeans), int(out.n_iter_sinkhorn)
            cam = out.cam.detach().clone()
            if ref is None: ref = cam
            else: r["max_abs_cam_vs_first"] = float((cam - ref).abs().max())
            r["forward_backward"] = timed(fwd_bwd(h), device, args.reps)
            r["counts_forward"] = op_counts(fwd(h), device)
            r["counts_forward_backward"] = op_counts(fwd_bwd(h), device)
        except Exception as e:                            # one variant failing keeps the others
            r["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"    {name}: FAILED {r['error']}", flush=True)
        save()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=16); p.add_argument("--classes", type=int, default=3)
    p.add_argument("--present", type=int, default=3, help="present foreground classes per image")
    p.add_argument("--K", type=int, default=3); p.add_argument("--D", type=int, default=768)
    p.add_argument("--grid", type=int, default=32); p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5); p.add_argument("--loop-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kmeans-iter", type=int, default=30); p.add_argument("--sinkhorn-iter", type=int, default=100)
    p.add_argument("--resnet-size", type=int, default=None, help="default: 512 on CUDA, 256 on CPU")
    p.add_argument("--resnet-reps", type=int, default=None, help="default: 10 on CUDA, 2 on CPU")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="ResNet-50 autocast (auto: bf16 on CUDA)")
    p.add_argument("--no-resnet", action="store_true"); p.add_argument("--no-loop", action="store_true")
    p.add_argument("--no-static", action="store_true", help="skip the GPU path (POTHead eager and compiled)")
    p.add_argument("--no-compile", action="store_true", help="time the GPU path eager only")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for POTHead (default: inductor's default)")
    p.add_argument("--static", default="eager-all,eager,eager-check8,compiled,compiled-check8,cudagraphs",
                   help="the GPU-path variants, comma-separated, of: " + ", ".join(STATIC) + " (CUDA graphs: CUDA only)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and iteration counts: a smoke test in seconds")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--layouts", default="channels-last,nchw",
                   help="memory layouts of the features to time, comma-separated: channels-last (what pot.train's network "
                        "produces) and/or nchw")
    p.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.D, args.grid, args.reps, args.loop_reps = 2, 8, 8, 2, 1
        args.kmeans_iter, args.sinkhorn_iter, args.resnet_size, args.resnet_reps = 3, 5, args.resnet_size or 32, 1
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available(): sys.exit("--device cuda but no CUDA GPU is visible")
    if args.resnet_size is None: args.resnet_size = 512 if cuda else 256
    if args.resnet_reps is None: args.resnet_reps = 10 if cuda else 2
    amp = args.amp == "bf16" or (args.amp == "auto" and cuda)
    if args._memory: return head_memory(args)
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    device = torch.device(args.device)
    F, S, labels = make_inputs(args, device)
    kw = dict(K=args.K, kmeans_iter=args.kmeans_iter, sinkhorn_iter=args.sinkhorn_iter)
    print(f"device {device} ({torch.cuda.get_device_name(0) if cuda else f'{args.threads} thread(s)'}), "
          f"batch {args.batch}, {args.classes} classes ({args.present} present) + bg, K={args.K}, D={args.D}, "
          f"grid {args.grid}x{args.grid}, malloc {'keeps freed memory' if kept else 'default'}, load {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}")
    res = dict(setting=dict(device=str(device), gpu=torch.cuda.get_device_name(0) if cuda else None, threads=args.threads,
                            batch=args.batch, classes=args.classes, present=args.present, K=args.K, D=args.D, grid=args.grid,
                            kmeans_iter=args.kmeans_iter, sinkhorn_iter=args.sinkhorn_iter, torch=torch.__version__),
               layouts={})
    def save():                                    # after every variant: a later failure or time-out keeps these numbers
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f: json.dump(res, f, indent=1)
            os.replace(tmp, args.json)
    save()
    for layout in args.layouts.split(","):
        Fl = F.contiguous(memory_format=torch.channels_last) if layout == "channels-last" else F.contiguous()
        r = res["layouts"][layout] = {}
        with torch.no_grad():
            r["a_forward"] = timed(lambda: pot_cams(Fl, S, labels, **kw), device, args.reps)
            out = pot_cams(Fl, S, labels, **kw)
            if not args.no_loop:
                u = kmeans_uniforms((args.batch, args.classes + 1, args.K))
                lkw = dict(K=args.K, u=u, kmeans_iter=args.kmeans_iter, sinkhorn_iter=args.sinkhorn_iter)
                r["b_loop_forward"] = timed(lambda: loop_pot_cams(Fl, S, labels, **lkw), device, args.loop_reps)
                r["max_abs_cam_loop_vs_batched"] = float((loop_pot_cams(Fl, S, labels, **lkw) - out.cam).abs().max())
        Fg = Fl.clone().requires_grad_(True)
        r["a_forward_backward"] = timed(lambda: pot_cams(Fg, S, labels, **kw).cam.sum().backward(), device, args.reps)
        r["a_counts_forward"] = op_counts(lambda: pot_cams(Fl, S, labels, **kw), device)
        r["n_iter_kmeans"], r["n_iter_sinkhorn"] = out.n_iter_kmeans, out.n_iter_sinkhorn
        print(f"features {layout}:")
        print(f"(a) pot_cams, batched      forward {r['a_forward'][0]:8.1f} ms/batch wall ({r['a_forward'][1]:.1f} ms CPU)"
              f"   forward+backward {r['a_forward_backward'][0]:8.1f} ms ({r['a_forward_backward'][1]:.1f} ms CPU)")
        c = r["a_counts_forward"]
        print(f"    k-means iterations {out.n_iter_kmeans}, Sinkhorn iterations {out.n_iter_sinkhorn}, n_empty {int(out.n_empty)};"
              f" per forward: {c['ops']} top-level ops, {c['host_syncs']} host syncs"
              + (f", {c['cuda_kernels']} CUDA kernels" if cuda else ""))
        if not args.no_loop:
            b = r["b_loop_forward"]
            r["loop_over_batched"] = b[0] / r["a_forward"][0]
            print(f"(b) per-image/class loop   forward {b[0]:8.1f} ms/batch wall ({b[1]:.1f} ms CPU)")
            print(f"    ratio (b)/(a): {b[0] / r['a_forward'][0]:.1f}x wall, {b[1] / r['a_forward'][1]:.1f}x CPU;"
                  f" max |CAM(a) - CAM(b)| = {r['max_abs_cam_loop_vs_batched']:.2e}")
        save()
    if not args.no_static:
        Fs = F.contiguous(memory_format=torch.channels_last)
        st = res["static"] = {}
        static_paths(args, device, Fs, S, labels, kw, st, save)
        print("GPU path (POTHead: static shapes, no host sync), features channels-last:")
        for name, r in st.items():
            if "counts_forward_backward" not in r: print(f"    {name:16s} {r.get('error', 'not finished')}"); continue
            cf, cb = r["counts_forward"], r["counts_forward_backward"]
            extra = f", max |CAM - first| = {r['max_abs_cam_vs_first']:.1e}" if "max_abs_cam_vs_first" in r else ""
            print(f"    {name:16s} forward {r['forward'][0]:8.1f} ms ({r['forward'][1]:.1f} ms CPU)   forward+backward "
                  f"{r['forward_backward'][0]:8.1f} ms   first call {r['first_call_s']:.1f} s{extra}")
            print(f"    {'':16s} per forward: {cf['ops']} top-level ops, {cf['host_syncs']} host syncs"
                  + (f", {cf['cuda_kernels']} CUDA kernels, {cf['cuda_graph_launches']} graph launches" if cuda else "")
                  + f"; per forward+backward: {cb['ops']} ops, {cb['host_syncs']} syncs"
                  + (f", {cb['cuda_kernels']} CUDA kernels" if cuda else ""))
        first = next(iter(res["layouts"].values()), None)
        if first and "forward_backward" in st.get("static compiled", {}):
            print(f"    compiled vs pot_cams (sync path, {next(iter(res['layouts']))}): forward {first['a_forward'][0] / st['static compiled']['forward'][0]:.2f}x,"
                  f" forward+backward {first['a_forward_backward'][0] / st['static compiled']['forward_backward'][0]:.2f}x")
            if "b_loop_forward" in first:
                print(f"    loop (b) / compiled forward: {first['b_loop_forward'][0] / st['static compiled']['forward'][0]:.1f}x")
    if not args.no_resnet:
        rn = resnet_step_ms(device, args.batch, args.resnet_size, args.resnet_reps, amp)
        res["resnet50_step"] = dict(ms=rn, size=args.resnet_size, amp_bf16=amp)
        print(f"ResNet-50 forward+backward, batch {args.batch} at {args.resnet_size}x{args.resnet_size}{', bf16 autocast' if amp else ''}: "
              f"{rn[0]:.1f} ms wall ({rn[1]:.0f} ms CPU)")
        heads = {f"pot_cams ({k})": (v["a_forward"], v["a_forward_backward"]) for k, v in res["layouts"].items()}
        heads |= {k: (v["forward"], v["forward_backward"]) for k, v in res.get("static", {}).items() if "forward_backward" in v}
        res["head_share"] = {}
        for name, (f, fb) in heads.items():
            res["head_share"][name] = dict(forward=f[0] / rn[0], forward_backward=fb[0] / rn[0],
                                           of_step=fb[0] / (fb[0] + rn[0]))
            print(f"    head {name:26s}/ ResNet-50 step: forward {100 * f[0] / rn[0]:.1f} %, forward+backward "
                  f"{100 * fb[0] / rn[0]:.1f} % wall; share of network + head: {100 * fb[0] / (fb[0] + rn[0]):.1f} %")
        save()
    if not args.no_memory:
        child = [sys.executable, __file__, "--_memory", "--device", args.device, "--batch", str(args.batch), "--classes",
                 str(args.classes), "--present", str(args.present), "--K", str(args.K), "--D", str(args.D), "--grid",
                 str(args.grid), "--threads", str(args.threads), "--noise", str(args.noise)]
        mem = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        res["peak_mib"] = mem["peak_mib"]; save()
        print(f"peak memory of the head (forward+backward), batch {args.batch}, {args.grid}x{args.grid} grid: {mem['peak_mib']:.0f} MiB"
              f" ({'CUDA max_memory_allocated rise' if cuda else 'VmHWM rise over VmRSS, fresh process'})")
    if args.json:
        with open(args.json, "w") as f: json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
