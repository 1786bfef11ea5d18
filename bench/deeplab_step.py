"""Benchmark of one DeepLabV2 training step (METHOD.md §5): forward, `seg_loss` (255 ignored), backward and SGD step of
`pot.deeplab.DeepLabV2` on random images and labels, at DeepLabV2's batch 10 and 321×321 crops by default.

    python bench/deeplab_step.py                                  # CPU: ResNet-101, batch 10, 321x321
    python bench/deeplab_step.py --device cuda                    # the same on a GPU (mixed precision, as training runs)
    python bench/deeplab_step.py --backbone resnet18 --crop 96    # the ToyVOC demo's network and crop

Times are medians over `--steps` steps after `--warmup` steps: wall clock and process CPU time (all threads together;
on a CPU shared with other jobs the wall time depends on them, the CPU time much less). `--threads` sets torch's
intra-op threads on CPU (default: torch's default, one per core).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pot.core import BadInputError, resolve_device, keep_freed_memory
from pot.data import IGNORE
from pot.deeplab import DeepLabV2, deeplab_param_groups, seg_loss
from pot.runs import amp_dtype


def step_time(backbone: str = "resnet101", batch_size: int = 10, crop: int = 321, steps: int = 3, warmup: int = 1,
              n_classes: int = 21, device: str = "cpu", amp: bool = True, seed: int = 0) -> dict:
    "Seconds per DeepLabV2 training step (forward, loss, backward, SGD) on random data: dict(sec_per_step=median wall, cpu_sec_per_step, times, …)."
    if steps < 1 or warmup < 0: raise BadInputError(f"steps={steps}, warmup={warmup}; expected steps >= 1, warmup >= 0")
    dev = resolve_device(device)
    keep_freed_memory()
    torch.manual_seed(seed)
    model = DeepLabV2(backbone, n_classes).to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(deeplab_param_groups(model, 2.5e-4), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
    on, dtype = amp_dtype(amp, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=on and dtype == torch.float16)
    x = torch.randn(batch_size, 3, crop, crop, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (batch_size, crop, crop), device=dev)
    y[torch.rand(y.shape, device=dev) < 0.25] = IGNORE
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times, cpu = [], []
    for k in range(warmup + steps):
        sync(); t0, c0 = time.perf_counter(), time.process_time()
        with torch.autocast(dev.type, dtype=dtype, enabled=on):
            logits = model(x)
        loss = seg_loss(logits, y)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
        sync()
        if k >= warmup: times.append(time.perf_counter() - t0); cpu.append(time.process_time() - c0)
    return dict(sec_per_step=float(np.median(times)), times=times, cpu_sec_per_step=float(np.median(cpu)), backbone=backbone, batch_size=batch_size, crop=crop,
                device=str(dev), amp=on, threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet101")
    p.add_argument("--batch_size", type=int, default=10)
    p.add_argument("--crop", type=int, default=321)
    p.add_argument("--classes", type=int, default=21, help="logits per pixel, background included (VOC: 21)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-amp", action="store_true", help="float32 on CUDA too")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    r = step_time(a.backbone, a.batch_size, a.crop, a.steps, a.warmup, a.classes, a.device, amp=not a.no_amp)
    where = r["gpu"] or f"CPU, {r['threads']} thread(s)"
    print(f"DeepLabV2 {a.backbone}, batch {a.batch_size}, {a.crop}x{a.crop}, {where}, amp={r['amp']}: "
          f"{r['sec_per_step']:.2f} s/step wall (median of {a.steps}), {r['cpu_sec_per_step']:.2f} s/step CPU")
    print(json.dumps(r))
    return r


if __name__ == "__main__": main()
