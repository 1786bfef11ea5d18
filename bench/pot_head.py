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

from pot.activation import pot_cams
from pot.core import keep_freed_memory
from pot.cluster import normalize_with_background, kmeans_uniforms
from pot.transport import synthetic_feature_maps


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


def loop_pot_cams(F, S, labels, tau=0.7, K=3, eps=0.1, rho=0.1, t=0.1, u=None):
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
                mu, sums, valid = loop_kmeans(Xd[:, idx], K, u[n, c].to(Xd.device, Xd.dtype))
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
        T = loop_sinkhorn(1 - Xd.T @ mu_all.T, b, eps, rho)
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


def resnet_step_ms(device, batch, size, reps):
    import torchvision
    net = torchvision.models.resnet50(weights=None).to(device)
    x = torch.randn(batch, 3, size, size, device=device); y = torch.randint(0, 1000, (batch,), device=device)
    def step():
        net.zero_grad(set_to_none=True)
        Fn.cross_entropy(net(x), y).backward()
    return timed(step, device, reps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=16); p.add_argument("--classes", type=int, default=3)
    p.add_argument("--present", type=int, default=3, help="present foreground classes per image")
    p.add_argument("--K", type=int, default=3); p.add_argument("--D", type=int, default=768)
    p.add_argument("--grid", type=int, default=32); p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5); p.add_argument("--loop-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resnet-size", type=int, default=256); p.add_argument("--resnet-reps", type=int, default=2)
    p.add_argument("--no-resnet", action="store_true"); p.add_argument("--no-loop", action="store_true")
    p.add_argument("--layouts", default="channels-last,nchw",
                   help="memory layouts of the features to time, comma-separated: channels-last (what pot.train's network "
                        "produces) and/or nchw")
    p.add_argument("--_memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available(): sys.exit("--device cuda but no CUDA GPU is visible")
    if args._memory: return head_memory(args)
    torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    device = torch.device(args.device)
    F, S, labels = make_inputs(args, device)
    print(f"device {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else f'{args.threads} thread(s)'}), "
          f"batch {args.batch}, {args.classes} classes ({args.present} present) + bg, K={args.K}, D={args.D}, "
          f"grid {args.grid}x{args.grid}, malloc {'keeps freed memory' if kept else 'default'}, load {os.getloadavg()[0]:.1f}")
    res = {}
    for layout in args.layouts.split(","):
        Fl = F.contiguous(memory_format=torch.channels_last) if layout == "channels-last" else F.contiguous()
        r = res[layout] = {}
        with torch.no_grad():
            r["a_forward"] = timed(lambda: pot_cams(Fl, S, labels, K=args.K), device, args.reps)
            out = pot_cams(Fl, S, labels, K=args.K)
            if not args.no_loop:
                u = kmeans_uniforms((args.batch, args.classes + 1, args.K))
                r["b_loop_forward"] = timed(lambda: loop_pot_cams(Fl, S, labels, K=args.K, u=u), device, args.loop_reps)
                diff = float((loop_pot_cams(Fl, S, labels, K=args.K, u=u) - out.cam).abs().max())
        Fg = Fl.clone().requires_grad_(True)
        r["a_forward_backward"] = timed(lambda: pot_cams(Fg, S, labels, K=args.K).cam.sum().backward(), device, args.reps)
        print(f"features {layout}:")
        print(f"(a) pot_cams, batched      forward {r['a_forward'][0]:8.1f} ms/batch wall ({r['a_forward'][1]:.1f} ms CPU)"
              f"   forward+backward {r['a_forward_backward'][0]:8.1f} ms ({r['a_forward_backward'][1]:.1f} ms CPU)")
        print(f"    k-means iterations {out.n_iter_kmeans}, Sinkhorn iterations {out.n_iter_sinkhorn}, n_empty {int(out.n_empty)}")
        if not args.no_loop:
            b = r["b_loop_forward"]
            print(f"(b) per-image/class loop   forward {b[0]:8.1f} ms/batch wall ({b[1]:.1f} ms CPU)")
            print(f"    ratio (b)/(a): {b[0] / r['a_forward'][0]:.1f}x wall, {b[1] / r['a_forward'][1]:.1f}x CPU;"
                  f" max |CAM(a) - CAM(b)| = {diff:.2e}")
    if not args.no_resnet:
        rn = resnet_step_ms(device, args.batch, args.resnet_size, args.resnet_reps)
        print(f"ResNet-50 forward+backward, batch {args.batch} at {args.resnet_size}x{args.resnet_size}: {rn[0]:.0f} ms wall ({rn[1]:.0f} ms CPU)")
        for layout, r in res.items():
            print(f"    head ({layout}) / ResNet-50 step: forward {100 * r['a_forward'][0] / rn[0]:.1f} % wall ({100 * r['a_forward'][1] / rn[1]:.1f} % CPU),"
                  f" forward+backward {100 * r['a_forward_backward'][0] / rn[0]:.1f} % wall ({100 * r['a_forward_backward'][1] / rn[1]:.1f} % CPU)")
    child = [sys.executable, __file__, "--_memory", "--device", args.device, "--batch", str(args.batch), "--classes",
             str(args.classes), "--present", str(args.present), "--K", str(args.K), "--D", str(args.D), "--grid",
             str(args.grid), "--threads", str(args.threads), "--noise", str(args.noise)]
    mem = json.loads(subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print(f"peak memory of the head (forward+backward), batch {args.batch}, {args.grid}x{args.grid} grid: {mem['peak_mib']:.0f} MiB"
          f" ({'CUDA max_memory_allocated rise' if args.device == 'cuda' else 'VmHWM rise over VmRSS, fresh process'})")


if __name__ == "__main__":
    main()
