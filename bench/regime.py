"""The rule of `00_core` ("The paper's regime on any image size") alone: old against new CAM inference on the same
trained networks, paired by seed.

    python bench/regime.py snapshot --tag old outputs/seeds outputs/seeds_photovoc   # after the old inference
    python bench/regime.py snapshot --tag new outputs/seeds outputs/seeds_photovoc   # after re-inferring the same runs
    python bench/regime.py report                                                   # the paired table (markdown)

`snapshot` copies, from every run folder of a seed sweep (`make seeds`: `<point>/` and `baseline_seed<s>/`), the CAM
results of `metrics.json` (mIoU, best background threshold, mean precision and recall of every map) with the inference
settings and the checkpoint's SHA-256 they were computed with into `bench/regime/<tag>.json`; `report` pairs the runs of
two tags that share a checkpoint (the same network) and prints mean ± sd over seeds of each map under both inferences.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAPS = {"classifier": "classifier CAM", "pot_k1": "POT, K=1", "pot": "POT (K=3)"}


def snapshot(tag: str, roots: list[str]) -> Path:
    path = HERE / "regime" / f"{tag}.json"
    out = json.loads(path.read_text()) if path.is_file() else {}          # runs of other roots snapshotted earlier stay
    for root in roots:
        for m in sorted(Path(root).glob("*/metrics.json")):
            metrics = json.loads(m.read_text())
            if "cam_eval" not in metrics: continue
            cfg = json.loads((m.parent / "config.json").read_text())["config"]
            out[str(m.parent)] = dict(benchmark=Path(root).name, run=m.parent.name, seed=cfg["seed"], lambda_con=cfg["lambda_con"],
                                      settings=metrics["cam_settings"],
                                      cams={k: {f: round(v[f], 3) for f in ("miou", "best_threshold", "mprecision", "mrecall")}
                                            for k, v in metrics["cam_eval"].items() if k in MAPS})
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{len(out)} runs -> {path}")
    return path


def _ms(xs): return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def report(old: str = "old", new: str = "new") -> str:
    a, b = (json.loads((HERE / "regime" / f"{t}.json").read_text()) for t in (old, new))
    lines = []
    for bench in sorted({r["benchmark"] for r in a.values()}):
        lines += [f"\n**{bench}** (mIoU, precision, recall: mean ± sd over seeds; 'new − old' paired by run)\n",
                  "| network | map | old mIoU | new mIoU | new − old | old prec. / rec. | new prec. / rec. | old / new best bg thr. |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm, is_base in (("baseline network", True), ("POT network", False)):
            runs = [k for k, r in a.items() if r["benchmark"] == bench and (r["lambda_con"] == 0) == is_base and k in b
                    and r["settings"]["checkpoint_sha256"] == b[k]["settings"]["checkpoint_sha256"]]
            for key, name in MAPS.items():
                if key == "pot_k1" and is_base: continue
                o = [a[k]["cams"][key] for k in runs]; n = [b[k]["cams"][key] for k in runs]
                if not o: continue
                lines.append(f"| {arm} ({len(runs)} seeds) | {name} | {_ms([x['miou'] for x in o])} | {_ms([x['miou'] for x in n])} | "
                             f"{_ms([y['miou'] - x['miou'] for x, y in zip(o, n)])} | "
                             f"{statistics.mean(x['mprecision'] for x in o):.0f} / {statistics.mean(x['mrecall'] for x in o):.0f} | "
                             f"{statistics.mean(x['mprecision'] for x in n):.0f} / {statistics.mean(x['mrecall'] for x in n):.0f} | "
                             f"{statistics.mean(x['best_threshold'] for x in o):.2f} / {statistics.mean(x['best_threshold'] for x in n):.2f} |")
        s_old = next(r["settings"] for r in a.values() if r["benchmark"] == bench)
        s_new = next(r["settings"] for r in b.values() if r["benchmark"] == bench)
        lines.append(f"\nold: cam_scales {s_old['cam_scales']}, scale_reference {s_old.get('scale_reference')}; "
                     f"new: cam_scales {s_new['cam_scales']}, scale_reference {s_new.get('scale_reference')}, pot_scales {s_new['pot_scales']}")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snapshot"); s.add_argument("--tag", required=True); s.add_argument("roots", nargs="+")
    r = sub.add_parser("report"); r.add_argument("--old", default="old"); r.add_argument("--new", default="new")
    args = p.parse_args()
    snapshot(args.tag, args.roots) if args.cmd == "snapshot" else report(args.old, args.new)
