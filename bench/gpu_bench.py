"""The GPU measurements of the project in one place, one section per process (`bench/gpu.sh` runs them all, each under a
time limit, and merges them into one JSON and one table):

    python bench/gpu_bench.py --section pot-step --device cuda --json out/pot_step.json
    python bench/gpu_bench.py --section clip-es  --device cuda --json out/clip_es.json
    python bench/gpu_bench.py --section deeplab  --device cuda --json out/deeplab.json
    python bench/gpu_bench.py --summary out/*.json --json out/gpu.json       # merge + print the table

Sections (random weights and data; nothing is downloaded):
- `pot-step`: a POT training step of `pot.model.POTNet` (ResNet-50, batch 16, 512x512, bfloat16 autocast, channels-last, SGD),
  network alone (classification loss only) vs network + POT head, for each head: `pot_cams` (the early-stopping path,
  host synchronisations and all), `POTHead(compile=False)` (static path, eager) and `POTHead(compile=True)` (static path,
  `torch.compile(fullgraph=True)`); also the head alone (forward+backward on the step's features), the compile time and
  the peak memory of each.
- `clip-es`: CLIP-ES images/s (`pot.clip_es.clip_es_cams`, autocast on CUDA, random ViT-B/16 weights), all present
  classes in one batched backward vs the per-class loop, 3 classes, at 224x224 and 500x375, with `bench/clip_es.py`'s
  timing (variants interleaved); peak memory of each.
- `deeplab`: one DeepLabV2 ResNet-101 training step at batch 10, 321x321 (`bench/deeplab_step.py` `step_time`, as
  `bench/deeplab_step.py`), and its peak memory.
`--tiny` shrinks every size (batch 2, 64x64 images, ResNet-18, ...) so the whole script runs on a CPU in about a minute:
that is what the CI test runs. Peak memory is CUDA `max_memory_allocated` (reset before each measurement); on CPU it is
the process's peak resident set size so far (`ru_maxrss`), a coarse upper bound.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

torch = Fn = None                     # --summary and --mark-failed run without torch (fast); --preflight reports it missing
if not {"--summary", "--mark-failed"} & set(sys.argv):
    try:
        import torch
        import torch.nn.functional as Fn
    except ImportError: pass

HERE = Path(__file__).resolve().parent


def write_json(path, obj):
    "Write `obj` to `path` atomically (a temporary file renamed): a run killed mid-write leaves the previous version."
    path = Path(path); tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float)); os.replace(tmp, path)


def fail_here(section, variant=None):
    "Raise if POT_BENCH_FAIL (comma-separated `section` or `section:variant`) names this section or variant: the test of partial results."
    for item in filter(None, os.environ.get("POT_BENCH_FAIL", "").split(",")):
        sec, _, var = item.partition(":")
        if sec == section and (var == "" if variant is None else var != "" and var in variant):
            raise RuntimeError(f"POT_BENCH_FAIL={item}: failing on purpose")


# the modules each section imports (pot's own modules pull in the rest); checked before anything runs
NEEDS = {"pot-step": ["torch", "timm", "torchvision", "pot.activation", "pot.model", "pot.loss"],
         "pot-head": ["torch", "torchvision", "pot.activation", "helpers"],
         "clip-es": ["torch", "open_clip", "ftfy", "wcwidth", "regex", "cv2", "pot.clip", "pot.clip_es"],
         "deeplab": ["torch", "torchvision", "deeplab_step"]}
THIRD_PARTY = ["torch", "torchvision", "timm", "numpy", "PIL", "cv2", "tqdm", "open_clip", "ftfy", "wcwidth", "regex",
               "huggingface_hub", "safetensors", "pydensecrf"]


def preflight(out=None) -> dict:
    "Which modules each section lacks; prints them and a last line `skip: <sections>`; writes {'preflight': ...} to `out`."
    import importlib, importlib.util
    sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
    if "pydensecrf" not in sys.modules:
        try: import pydensecrf.densecrf  # noqa: F401
        except ImportError: _stub_densecrf()
    have = {m: importlib.util.find_spec(m) is not None for m in THIRD_PARTY}
    print("modules: " + ", ".join(f"{m} {'ok' if ok else 'MISSING'}" for m, ok in have.items())
          + (" (pydensecrf: stubbed, the DeepLab step does not use it)" if not have["pydensecrf"] else ""))
    res = dict(modules=have, sections={})
    for sec, mods in NEEDS.items():
        missing = []
        for m in mods:
            try: importlib.import_module(m)
            except ModuleNotFoundError as e: missing.append(e.name if e.name and e.name != m else m)
            except Exception as e: missing.append(f"{m} ({type(e).__name__}: {e})")
        res["sections"][sec] = sorted(set(missing))
        print(f"  {sec}: " + ("ok" if not missing else "missing " + ", ".join(sorted(set(missing)))))
    skip = [s for s, m in res["sections"].items() if m]
    if out: write_json(out, dict(preflight=res))
    print("skip: " + " ".join(skip))
    return res


def _stub_densecrf():
    "pot.deeplab imports pot.crf, which needs pydensecrf; the training step does not: a stub stands in."
    import types
    crf = types.ModuleType("pydensecrf"); crf.densecrf = types.ModuleType("pydensecrf.densecrf")
    sys.modules.update({"pydensecrf": crf, "pydensecrf.densecrf": crf.densecrf})


def _sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def _reset_peak(dev):
    if dev.type == "cuda": _sync(dev); torch.cuda.reset_peak_memory_stats(dev); return torch.cuda.memory_allocated(dev)
    return 0


def _peak_mib(dev, base=0):
    if dev.type == "cuda": _sync(dev); return (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10          # KiB on Linux -> MiB


def _median_ms(fn, dev, reps, warmup=1):
    for _ in range(warmup): fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); _sync(dev); ts.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ts)


# ---------------------------------------------------------------------------------------------------------------
def pot_step(args, dev, res, save) -> dict:
    "Network step vs network + POT head (each head a variant), the head alone, compile time and peak memory; `save()` after each."
    from pot.activation import pot_cams, POTHead
    from pot.cluster import normalize_with_background
    from pot.loss import classification_loss, consistency_loss
    from pot.model import POTNet
    tiny = args.tiny
    B, size, C = (2, 64, 20) if tiny else (args.batch, args.size, 20)
    backbone = "resnet18" if tiny else args.backbone
    amp = dev.type == "cuda" and not args.no_amp
    torch.manual_seed(0)
    model = POTNet(backbone, num_classes=C, feature_stride=16, pretrained=None).to(dev).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    x = torch.randn(B, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(B, C)
    for n in range(B): labels[n, torch.randperm(C, generator=g)[:1 + n % 3]] = 1          # 1-3 classes per image
    labels = labels.to(dev)
    kw = dict(tau=0.7, K=3, eps=0.1, rho=0.1)
    if tiny: kw.update(kmeans_iter=3, sinkhorn_iter=5)
    heads = {"pot_cams (early-stopping path)": None, "POTHead eager (static path)": POTHead(compile=False),
             "POTHead eager, check_every=8": POTHead(compile=False, check_every=8)}
    if not args.no_compile:
        heads["POTHead compiled (static path)"] = POTHead(compile=True)
        if dev.type == "cuda":                  # compiled in ~18 pieces: too slow to compile for the CPU smoke test
            heads["POTHead compiled, check_every=8"] = POTHead(compile=True, check_every=8)
        if args.reduce_overhead and dev.type == "cuda":
            heads["POTHead compiled, CUDA graphs"] = POTHead(compile=True, mode="reduce-overhead")
    labels_host = labels.cpu()

    def run_head(name, feats, S, valid, gen):
        if heads[name] is None: return pot_cams(feats, S, labels, generator=gen, valid=valid, **kw)
        if "CUDA graphs" in name: torch.compiler.cudagraph_mark_step_begin()   # a replay may overwrite the last step's outputs
        return heads[name](feats, S, labels, generator=gen, valid=valid, host_labels=labels_host, **kw)

    def step(name=None):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = classification_loss(out["logits"].float(), labels)
        if name is not None:                                   # as pot.train.pot_step_losses: seeds from the classifier CAM
            feats = out["F"].float(); grid = feats.shape[-2:]
            cam = Fn.interpolate(out["cams"].float(), grid, mode="bilinear", align_corners=False)
            A_cls = normalize_with_background(cam, labels)
            S = normalize_with_background(cam.detach(), labels)
            valid = torch.ones(B, *grid, device=dev)
            pot = run_head(name, feats, S, valid, torch.Generator().manual_seed(1))
            loss = loss + consistency_loss(pot.cam, A_cls, pot.w, pot.present)
        loss.backward()
        opt.step()

    res["setting"] = dict(backbone=backbone, batch=B, size=size, classes=C, amp_bf16=amp, device=str(dev),
                          gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None, torch=torch.__version__,
                          feature_dim=model.feature_dim)
    base = _reset_peak(dev)
    res["network"] = dict(ms=_median_ms(step, dev, args.reps, warmup=2), peak_mib=_peak_mib(dev, base))
    save()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        out = model(x)
    feats0 = out["F"].float().detach()
    cam0 = Fn.interpolate(out["cams"].float(), feats0.shape[-2:], mode="bilinear", align_corners=False)
    S0 = normalize_with_background(cam0, labels); v0 = torch.ones(B, *feats0.shape[-2:], device=dev)
    res["grid"] = list(feats0.shape[-2:])
    res["heads"] = {}
    for name in heads:
        r = res["heads"][name] = {}
        try:
            fail_here("pot-step", name)
            Fg = feats0.clone().requires_grad_(True)
            def head_only():
                Fg.grad = None
                run_head(name, Fg, S0, v0, torch.Generator().manual_seed(1)).cam.sum().backward()
            t0 = time.perf_counter(); head_only(); _sync(dev); r["first_call_s"] = time.perf_counter() - t0   # compiles
            base = _reset_peak(dev)
            r["head_ms"] = _median_ms(head_only, dev, args.reps)
            r["head_peak_mib"] = _peak_mib(dev, base)
            base = _reset_peak(dev)
            r["step_ms"] = _median_ms(lambda: step(name), dev, args.reps, warmup=2)
            r["step_peak_mib"] = _peak_mib(dev, base)
            r["head_in_step_ms"] = r["step_ms"] - res["network"]["ms"]
            r["head_share_of_step"] = r["head_in_step_ms"] / r["step_ms"]
            print(f"  {name:34s} step {r['step_ms']:8.1f} ms (network {res['network']['ms']:.1f} ms, head {r['head_in_step_ms']:.1f} ms = "
                  f"{100 * r['head_share_of_step']:.1f} %), head alone {r['head_ms']:.1f} ms, first call {r['first_call_s']:.1f} s", flush=True)
        except Exception as e:                   # one variant failing keeps the others
            r["error"] = f"{type(e).__name__}: {e}"[:500]
            print(f"  {name}: FAILED {r['error']}", flush=True)
        save()
    return res


def _load(name):
    "Import one of the bench/*.py scripts as a module (they are scripts, not a package)."
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def clip_es(args, dev, res, save) -> dict:
    "CLIP-ES images/s, batched classes vs per-class loop, with bench/clip_es.py's interleaved timing; peak memory."
    import pot.clip_es as ce
    from pot.clip import load_clip
    from pot.data import VOC_CLASSES
    cb = _load("clip_es")
    amp = dev.type == "cuda" and not args.no_amp
    model = load_clip(None, dev)
    keys = [[3, 15, 12]]                                            # bird, person, dog (as bench/clip_es.py)
    sizes = ((64, 64), (48, 80)) if args.tiny else ((224, 224), (375, 500))
    reps = 1 if args.tiny else args.reps
    res["setting"] = dict(device=str(dev), amp=amp, classes=len(keys[0]), weights="random", torch=torch.__version__)
    for hw in sizes:
        img = cb.images(1, hw)
        fns = dict(batched=lambda t: ce.clip_es_cams(model, img, keys, VOC_CLASSES, timer=t, amp=amp),
                   loop=lambda t: ce.clip_es_cams(model, img, keys, VOC_CLASSES, batched=False, timer=t, amp=amp))
        med, _ = cb.time_variants(fns, reps, dev)
        r = res[f"{hw[1]}x{hw[0]}"] = {}
        for k, f in fns.items():
            base = _reset_peak(dev); f(None)
            r[k] = dict(images_per_s=1 / med[k], ms=1e3 * med[k], peak_mib=_peak_mib(dev, base))
        r["batched_over_loop"] = med["loop"] / med["batched"]
        print(f"  {hw[1]}x{hw[0]}: batched {r['batched']['images_per_s']:.2f} img/s, loop {r['loop']['images_per_s']:.2f} img/s "
              f"({r['batched_over_loop']:.2f}x)", flush=True)
        save()
    return res


def deeplab(args, dev, res, save) -> dict:
    "One DeepLabV2 training step (bench/deeplab_step.py's measurement) and its peak memory."
    try: import pydensecrf.densecrf  # noqa: F401  (pot.deeplab imports pot.crf, which needs it; the step does not)
    except ImportError:
        _stub_densecrf(); print("  (pydensecrf is not installed: stubbed, the training step does not use CRF)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deeplab_step import step_time
    bb, B, crop = ("resnet18", 2, 65) if args.tiny else ("resnet101", 10, 321)
    base = _reset_peak(dev)
    r = step_time(bb, B, crop, steps=1 if args.tiny else args.reps, warmup=1 if args.tiny else 2, n_classes=21,
                  device=str(dev), amp=not args.no_amp)
    r["peak_mib"] = _peak_mib(dev, base)
    res.update(r)
    print(f"  DeepLabV2 {bb}, batch {B}, {crop}x{crop}: {1e3 * r['sec_per_step']:.1f} ms/step, peak {r['peak_mib']:.0f} MiB", flush=True)
    return res


SECTIONS = {"pot-step": pot_step, "clip-es": clip_es, "deeplab": deeplab}


# ---------------------------------------------------------------------------------------------------------------
def table(res: dict) -> str:
    "The printed summary of a merged result."
    L = [f"# GPU benchmark — {res.get('device', '?')}, torch {res.get('torch', '?')}{' (tiny sizes)' if res.get('tiny') else ''}"]
    def row(*c): L.append("| " + " | ".join(str(x) for x in c) + " |")
    f1 = lambda v: "—" if v is None else f"{v:.1f}"
    for sec, r in res["sections"].items():
        L.append(f"\n## {sec}" + (f": {r['error']}" if "error" in r else ""))
        if sec == "pot-step" and "network" in r:
            s = r["setting"]
            L.append(f"{s['backbone']}, batch {s['batch']}, {s['size']}x{s['size']}, grid {'x'.join(map(str, r.get('grid', '?')))}, "
                     f"bf16 autocast {s['amp_bf16']}, {s['classes']} classes")
            row("step", "ms", "head in step, ms", "head share", "head alone fwd+bwd, ms", "first call, s", "peak MiB"); row(*["---"] * 7)
            row("network only", f1(r["network"]["ms"]), "", "", "", "", f1(r["network"]["peak_mib"]))
            for k, h in r.get("heads", {}).items():
                if "step_ms" not in h: row(f"network + {k}", h.get("error", "not finished"), "", "", "", "", ""); continue
                row(f"network + {k}", f1(h["step_ms"]), f1(h["head_in_step_ms"]), f"{100 * h['head_share_of_step']:.1f} %",
                    f1(h["head_ms"]), f1(h["first_call_s"]), f1(h["step_peak_mib"]))
        elif sec == "clip-es" and any("x" in k and isinstance(v, dict) for k, v in r.items()):
            row("image", "batched img/s", "loop img/s", "batched / loop", "peak MiB batched", "peak MiB loop"); row(*["---"] * 6)
            for k, v in r.items():
                if k in ("setting", "error") or not isinstance(v, dict): continue
                row(k, f"{v['batched']['images_per_s']:.2f}", f"{v['loop']['images_per_s']:.2f}", f"{v['batched_over_loop']:.2f}x",
                    f1(v["batched"]["peak_mib"]), f1(v["loop"]["peak_mib"]))
        elif sec == "deeplab" and "sec_per_step" in r:
            row("DeepLabV2", "batch", "crop", "ms/step", "amp", "peak MiB"); row(*["---"] * 6)
            row(r["backbone"], r["batch_size"], r["crop"], f1(1e3 * r["sec_per_step"]), r["amp"], f1(r["peak_mib"]))
        elif sec == "pot-head":
            st = r.get("static", {})
            row("head (bench/pot_head.py)", "forward ms", "fwd+bwd ms", "ops/forward", "host syncs", "CUDA kernels"); row(*["---"] * 6)
            for k, v in r.get("layouts", {}).items():
                if "a_counts_forward" not in v: continue
                c = v["a_counts_forward"]
                row(f"pot_cams ({k})", f1(v["a_forward"][0]), f1(v["a_forward_backward"][0]), c["ops"], c["host_syncs"], c.get("cuda_kernels", "—"))
            for k, v in st.items():
                if "counts_forward" not in v: row(k, v.get("error", "not finished"), "", "", "", ""); continue
                c = v["counts_forward"]
                row(k, f1(v["forward"][0]), f1(v["forward_backward"][0]), c["ops"], c["host_syncs"], c.get("cuda_kernels", "—"))
            for k, v in r.get("head_share", {}).items():
                L.append(f"- {k}: {100 * v['forward_backward']:.1f} % of a ResNet-50 step")
    L.append(f"\nwall time of the whole run: {res.get('wall_s', 0):.0f} s")
    return "\n".join(L)


def summary(paths, out, wall_s=None, tiny=False) -> dict:
    res = dict(sections={}, tiny=tiny, wall_s=wall_s)
    if out and Path(out).exists():               # keep the pre-flight's findings
        try: res["preflight"] = json.loads(Path(out).read_text()).get("preflight")
        except ValueError: pass
    for p in paths:
        p = Path(p)
        if not p.exists(): continue
        try: d = json.loads(p.read_text())
        except ValueError as e: d = dict(result=dict(error=f"unreadable {p.name}: {e}"))
        res["sections"][d.get("section", p.stem)] = d.get("result", d)
        res.setdefault("device", d.get("device")); res.setdefault("torch", d.get("torch"))
    text = table(res)
    print(text)
    if out: write_json(out, res)
    return res


def mark_failed(path, section, why):
    "After a section's process failed: keep what it wrote and add `error`, or write an error record."
    p = Path(path)
    try: d = json.loads(p.read_text())
    except (OSError, ValueError): d = dict(section=section, result={})
    r = d.setdefault("result", {}) if "result" in d or "section" in d else d
    kept = len([k for k in r if k != "error"]) > 0
    r["error"] = (f"{r['error']} ({why})" if "error" in r else why) + ("; partial results kept" if kept else "")
    write_json(p, d)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--section", choices=list(SECTIONS))
    p.add_argument("--summary", nargs="*", default=None, help="merge these section JSON files and print the table")
    p.add_argument("--wall-s", type=float, default=None)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU smoke test")
    p.add_argument("--batch", type=int, default=16); p.add_argument("--size", type=int, default=512)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-amp", action="store_true"); p.add_argument("--no-compile", action="store_true")
    p.add_argument("--reduce-overhead", action="store_true", help="also time the compiled head with CUDA graphs")
    p.add_argument("--json", default=None)
    p.add_argument("--preflight", action="store_true", help="print the modules each section lacks (and write them to --json)")
    p.add_argument("--mark-failed", nargs=2, metavar=("SECTION", "WHY"), help="add an error to the section JSON --json")
    args = p.parse_args(argv)
    if args.preflight: return preflight(args.json)
    if args.mark_failed: return mark_failed(args.json, *args.mark_failed)
    if args.summary is not None: return summary(args.summary, args.json, args.wall_s, args.tiny)
    if args.section is None: p.error("--section or --summary is required")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu": torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("POT_BENCH_THREADS", "2"))))
    print(f"# {args.section} on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}{' (tiny)' if args.tiny else ''}", flush=True)
    t0 = time.perf_counter()
    d = dict(section=args.section, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
             torch=torch.__version__, seconds=None, result={})
    def save():                                  # after every variant: a later failure or time-out keeps these numbers
        d["seconds"] = time.perf_counter() - t0
        if args.json: write_json(args.json, d)
    try:
        save()
        fail_here(args.section)
        SECTIONS[args.section](args, dev, d["result"], save)
    except Exception as e:
        d["result"]["error"] = f"{type(e).__name__}: {e}"[:1000]; save()
        raise
    save()
    return d


if __name__ == "__main__":
    main()
