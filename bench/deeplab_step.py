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

import torch

from pot.deeplab import step_time


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
