"""Benchmark of the IRN stage's steps (`pot.irn`, `pot.relations`): the random walk (sparse against IRN's dense
squaring) at ToyVOC and VOC grid sizes, the boundary map, the labels of one image and a training step; minimum of
3 runs each, on this process's torch threads.

    .venv/bin/python bench/irn_steps.py
"""
import json
import time

import numpy as np
import torch

from pot.irn import IRNConfig, IRNet, edge_map, irn_label, irn_param_groups
from pot.relations import RelationPaths, irn_losses, random_walk


def bench_irn() -> dict:
    "Seconds (min of 3) of the random walk (sparse / dense), the boundary map, the labels and a training step, at ToyVOC and VOC size."
    def best(f, n=3):
        f(); ts = []
        for _ in range(n): t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        return min(ts)
    torch.manual_seed(0)
    res = dict(threads=torch.get_num_threads())
    for name, (h, w) in dict(toyvoc=(30, 40), voc=(94, 125)).items():
        edge, cams = torch.rand(h, w) ** 4, torch.rand(2, h, w)
        res[f"walk_sparse_{name}"] = best(lambda: random_walk(cams, edge))
        if name == "toyvoc": res[f"walk_dense_{name}"] = best(lambda: random_walk(cams, edge, method="dense"), 1)
    net = IRNet("resnet18").eval()
    img = (np.random.rand(120, 160, 3) * 255).astype(np.uint8)
    res["edge_map"] = best(lambda: edge_map(net, img))
    e = edge_map(net, img)
    res["irn_label"] = best(lambda: irn_label(e, np.random.rand(2, 120, 160).astype(np.float32), [1, 2]))
    cfg = IRNConfig.preset("toyvoc")
    paths, opt = RelationPaths(cfg.radius), torch.optim.SGD(irn_param_groups(net.train(), 0.1), lr=0.1, momentum=0.9)
    x, lab = torch.randn(cfg.batch_size, 3, cfg.crop, cfg.crop), torch.randint(0, 3, (cfg.batch_size, cfg.crop // 4, cfg.crop // 4))
    def step():
        l = irn_losses(net(x), lab, paths); opt.zero_grad(); l["loss"].backward(); opt.step()
    res["train_step"] = best(step, 2)
    return res


if __name__ == "__main__":
    print(json.dumps(bench_irn(), indent=1))
