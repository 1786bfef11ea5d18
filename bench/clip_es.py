"""Benchmark of pot.clip and pot.clip_es (CLIP-ES seed CAMs), side by side in one run, random ViT-B/16 weights.

    .venv/bin/python bench/clip_es.py                      # CPU, float32
    .venv/bin/python bench/clip_es.py --device cuda --amp  # GPU with autocast

Measures, with the variants interleaved so that load from other jobs hits all of them alike:
1. images/s of the batched backward (all present classes in one vmapped backward) vs the per-class loop
   (last block re-run and one backward per class; the same code otherwise), 3 present classes, at 224x224
   and 500x375, with the split of time: shared forward of the first 11 blocks / last block / backward /
   refinement (+ preprocessing). A third variant, `reference-style`, is the loop with the last block's
   weights requiring grad and `loss.backward()` per class, as the public CLIP-ES code runs it (it never
   freezes CLIP), for comparison with the issue's profile;
2. prompt encoding of the 45 VOC prompts: one at a time (full 77-token context, as the reference does),
   batched with the full context, batched and truncated after the end token (the library);
3. images/s vs batch size with size bucketing (images of equal padded size share a batch).
Timings are medians over repetitions; compare ratios, not absolute numbers, on a shared machine.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import pot.clip as clip
import pot.clip_es as ce
from pot.core import keep_freed_memory
from pot.data import VOC_CLASSES


def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def images(n, hw, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, tuple(hw) + (3,), dtype=np.uint8) for _ in range(n)]


def reference_style_cams(model, imgs, keys, classes, timer=None):
    "The per-class loop as the public CLIP-ES code runs it: weights require grad, last block + loss.backward() per class."
    dev = next(model.parameters()).device
    fg_t, bg_t = clip.text_features(model, classes)
    vis = model.visual
    blk = vis.transformer.resblocks[-1]
    params = list(blk.parameters()) + list(vis.ln_post.parameters()) + [vis.proj]
    out = []
    for img, k in zip(imgs, keys):
        with clip.timed(timer, "preprocess", dev): x = clip.preprocess_image(img)[None].to(dev)
        k = torch.as_tensor(k)
        text = torch.cat([fg_t[k - 1], bg_t])[None]
        with clip.timed(timer, "shared", dev): xin, attn, grid = clip.vit_trunk(vis, x)
        for p in params: p.requires_grad_(True)
        scale = model.logit_scale.exp()
        grads = []
        for c in range(len(k)):
            with torch.enable_grad():
                a = blk.ln_1(xin).detach().requires_grad_(True)
                with clip.timed(timer, "last_block", dev):
                    qkv = F.linear(a, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
                    o, w = clip.vit_block(blk, xin, need_weights=True, qkv=qkv)
                    e = F.normalize(vis.ln_post(o)[:, 1:].mean(1) @ vis.proj, dim=-1)
                    p = (scale * e @ text[0].T).softmax(-1)
                with clip.timed(timer, "backward", dev):
                    p[0, c].backward()
            grads.append(a.grad)
            for q in params: q.grad = None
        for q in params: q.requires_grad_(False)
        with clip.timed(timer, "refine", dev):
            g = torch.stack(grads, 1)
            cam = torch.relu(torch.einsum("bkd,bnd->bkn", g[:, :, 1:].mean(2), a.detach()[:, 1:]))
            cam = ce.scale_gradcam(cam.view(1, len(k), *grid))
            T = ce.attention_affinity((attn + w[:, 1:, 1:].detach()) / 8)
            out.append(ce.refine_cams(T, cam, ce.cam_box_masks(cam))[0].cpu())
    return out


CPU_TIMES = {}


def time_variants(fns: dict, reps: int, dev) -> tuple[dict, dict]:
    """Interleaved repetitions of each variant, timed without stage timers (they synchronise the GPU);
    then one more call of each with the stage timer. Returns (median wall seconds, stage timer) per variant;
    the median CPU (process) seconds go to CPU_TIMES."""
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for k, f in fns.items(): f(None)                                   # warm-up
    for _ in range(reps):
        for k, f in fns.items():
            sync(dev); t, c = time.perf_counter(), time.process_time(); f(None); sync(dev)
            times[k].append(time.perf_counter() - t); cpu[k].append(time.process_time() - c)
    timers = {k: {} for k in fns}
    for k, f in fns.items(): f(timers[k])
    CPU_TIMES.clear(); CPU_TIMES.update({k: statistics.median(v) for k, v in cpu.items()})
    return {k: statistics.median(v) for k, v in times.items()}, timers


def split(timer: dict) -> str:
    tot = sum(timer.values())
    return " / ".join(f"{k} {100 * timer.get(k, 0) / tot:.0f}%" for k in ("preprocess", "shared", "last_block", "backward", "refine"))


def bench_classes(model, dev, args, res):
    keys = [[3, 15, 12]]                                               # bird, person, dog
    print("\n## 1. batched backward vs per-class loop (3 present classes, 1 image per call)")
    for hw in ((224, 224), (375, 500)):
        img = images(1, hw)
        fns = dict(batched=lambda t: ce.clip_es_cams(model, img, keys, VOC_CLASSES, timer=t, amp=args.amp),
                   loop=lambda t: ce.clip_es_cams(model, img, keys, VOC_CLASSES, batched=False, timer=t, amp=args.amp))
        if not args.amp: fns["reference-style"] = lambda t: reference_style_cams(model, img, keys, VOC_CLASSES, timer=t)
        med, timers = time_variants(fns, args.reps, dev)
        print(f"{hw[0]}x{hw[1]}:")
        cpu = dict(CPU_TIMES)
        for k in fns:
            print(f"  {k:16s} {1 / med[k]:7.3f} img/s  ({med[k] * 1e3:7.1f} ms/img wall, {cpu[k] * 1e3:7.1f} ms CPU)   {split(timers[k])}")
        print(f"  speed-up batched vs loop: {med['loop'] / med['batched']:.2f}x wall, {cpu['loop'] / cpu['batched']:.2f}x CPU time" +
              (f";  vs reference-style: {med['reference-style'] / med['batched']:.2f}x wall, "
               f"{cpu['reference-style'] / cpu['batched']:.2f}x CPU time" if "reference-style" in med else ""))
        res[f"classes_{hw[0]}x{hw[1]}"] = dict(seconds=med, cpu_seconds=cpu, split={k: timers[k] for k in fns})
        with tempfile.TemporaryDirectory() as d:                        # what this image costs in the cache
            maps = ce.clip_es_cams(model, img, keys, VOC_CLASSES, amp=args.amp)[0]
            n = ce.write_clip_cam(f"{d}/x.npz", keys[0], maps, hw).stat().st_size
        coco = ce.projected_cache_bytes(n, 1, maps.numel()) / 1e9
        print(f"  cache file: {n} bytes for {len(keys[0])} maps of {tuple(maps.shape[1:])} -> projected COCO train {coco:.2f} GB")
        res[f"classes_{hw[0]}x{hw[1]}"].update(cache_bytes=n, projected_coco_train_gb=coco)


def bench_prompts(model, dev, args, res):
    print("\n## 2. prompt encoding, 45 VOC prompts (20 classes + 25 background words)")
    fg, bg = clip.clip_prompts(VOC_CLASSES)
    prompts = fg + bg
    tok = clip.clip_tokenizer(model.pot_clip["name"])

    def one_at_a_time(_):
        with torch.no_grad(): [model.encode_text(tok([p]).to(dev)) for p in prompts]

    def batched_full(_):
        with torch.no_grad(): model.encode_text(tok(prompts).to(dev))

    def batched_truncated(_):
        clip.forget_prompts(model)
        clip.encode_prompts(model, prompts)

    med, _ = time_variants(dict(one_at_a_time=one_at_a_time, batched_full=batched_full, batched_truncated=batched_truncated),
                           max(2, args.reps // 2), dev)
    for k, v in med.items(): print(f"  {k:18s} {v:7.3f} s")
    t = time.perf_counter(); clip.encode_prompts(model, prompts); cached = time.perf_counter() - t
    print(f"  cached (second call) {cached * 1e6:.0f} us;  one-at-a-time / batched-truncated: {med['one_at_a_time'] / med['batched_truncated']:.1f}x")
    res["prompts"] = dict(seconds=med, cached_seconds=cached)


def bench_batch(model, dev, args, res):
    print("\n## 3. images/s vs batch size (size bucketing; 3 classes per image)")
    sets = {"224x224": images(args.n_batch_images, (224, 224), 1)}
    mixed = [(375, 500), (500, 375), (333, 500), (375, 500)]        # VOC-like sizes: two padded shapes
    sets["VOC-like mixed"] = [images(1, mixed[i % len(mixed)], 2 + i)[0] for i in range(args.n_batch_images)]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    for name, imgs in sets.items():
        keys = [[3, 15, 12]] * len(imgs)
        fns = {b: (lambda t, b=b: ce.clip_es_cams(model, imgs, keys, VOC_CLASSES, batch_size=b, amp=args.amp, timer=t)) for b in sizes}
        med, _ = time_variants(fns, max(1, args.reps // 2), dev)
        buckets = len({clip.clip_input_size(i.shape[:2]) for i in imgs})
        print(f"  {name} ({len(imgs)} images, {buckets} size bucket(s)): " +
              ",  ".join(f"B={b}: {len(imgs) / med[b]:.2f} img/s" for b in sizes))
        res[f"batch_{name}"] = {str(b): len(imgs) / med[b] for b in sizes}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="autocast (bf16/fp16) for the network")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--batch_sizes", default="1,2,4")
    p.add_argument("--n_batch_images", type=int, default=8)
    p.add_argument("--skip", default="", help="comma list of sections to skip: classes,prompts,batch")
    p.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = p.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    kept = keep_freed_memory()       # as the cache generation (`pot-clip-cams`) does; POT_MALLOC=default to compare
    dev = torch.device(args.device)
    model = clip.load_clip(None, dev)
    info = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
                amp=args.amp, torch=torch.__version__, malloc="keeps freed memory" if kept else "default", loadavg=os.getloadavg())
    print(f"# pot.clip / pot.clip_es benchmark: {info}")
    res = dict(info=info)
    skip = set(args.skip.split(","))
    if "classes" not in skip: bench_classes(model, dev, args, res)
    if "prompts" not in skip: bench_prompts(model, dev, args, res)
    if "batch" not in skip: bench_batch(model, dev, args, res)
    res["info"]["loadavg_end"] = os.getloadavg()
    print(f"\nload average at start {info['loadavg']}, at end {res['info']['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f: json.dump(res, f, indent=1, default=float)


if __name__ == "__main__":
    main()
