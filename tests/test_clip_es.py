"""CLIP-ES seed CAMs (pot.clip, pot.clip_es): weights, prompts, the batched algorithm, the cache and its resume.

Everything runs on CPU with a randomly initialised ViT-B/16 (no weights are downloaded) on a few small
ToyVOC images. The random model's query/key projections are scaled by 4 (attention logits x16) so its
attention is peaked like a trained CLIP's; with open_clip's default init the Sinkhorn-normalised affinity
is nearly uniform and the refined maps are a constant plus rounding noise.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pot.core import BadInputError, load_json, save_checkpoint
from pot.data import VOC_CLASSES, load_dataset
from pot.datasets import TrainDataset
from pot.toyvoc import TOYVOC_CLASSES, generate_toyvoc
import pot.clip as clip
import pot.clip_es as ce
from helpers import cli_error

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model():
    m = clip.load_clip(None, "cpu", seed=0)
    for b in m.visual.transformer.resblocks: b.attn.in_proj_weight[:2 * 768] *= 4
    return m


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    return generate_toyvoc(tmp_path_factory.mktemp("toy") / "toyvoc", n_train=6, n_val=2, size=64, progress=False)


def _images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in [(60, 90), (64, 96), (100, 40)][:n]]


# ---------------------------------------------------------------- weights
def test_quickgelu_config_is_chosen(model):
    from open_clip.transformer import QuickGELU
    assert clip.clip_model_name() == "ViT-B-16-quickgelu" and clip.clip_model_name(quick_gelu=False) == "ViT-B-16"
    assert model.pot_clip["name"] == "ViT-B-16-quickgelu"
    for tower in (model.visual.transformer, model.transformer):
        assert all(isinstance(b.mlp.gelu, QuickGELU) for b in tower.resblocks)


def test_openai_offline_error_names_the_file_to_pass(monkeypatch):
    def offline(): raise OSError("no network")
    monkeypatch.setattr(clip, "_openai_weights_file", offline)
    with pytest.raises(BadInputError) as e: clip.load_clip("openai")
    msg = str(e.value)
    assert "pretrained=" in msg and "--convert_openai" in msg and "ViT-B-16.pt" in msg and "open_clip_pytorch_model.bin" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert clip._hub_reachable() is False                      # no network call when offline is declared


def test_load_state_dict_in_openai_format(model, tmp_path):
    w = "visual.transformer.resblocks.3.mlp.c_fc.weight"
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}   # OpenAI ships fp16
    sd[w] = sd[w] + 1                                                   # so that loading is visible
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    save_checkpoint(tmp_path / "openai_format.pt", sd)
    m = clip.load_clip(tmp_path / "openai_format.pt")
    assert m.pot_clip["name"] == "ViT-B-16-quickgelu"
    assert torch.equal(m.state_dict()[w], sd[w].float())
    assert m.state_dict()[w].dtype == torch.float32 and not any(p.requires_grad for p in m.parameters())


def test_open_clip_wrapper_and_bad_keys(tmp_path):
    save_checkpoint(tmp_path / "wrapped.pt", {"state_dict": {"module.logit_scale": torch.ones(())}, "epoch": 3})
    assert list(clip.read_clip_state_dict(tmp_path / "wrapped.pt")) == ["logit_scale"]
    with pytest.raises(BadInputError, match="missing key"): clip.load_clip(tmp_path / "wrapped.pt")
    with pytest.raises(BadInputError, match="file not found"): clip.load_clip(tmp_path / "nope.pt")


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_torchscript_is_refused_and_converted_once(tmp_path):
    class Holder(torch.nn.Module):                              # a TorchScript archive shaped like OpenAI's
        def __init__(self):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.ones((), dtype=torch.float16))
            self.register_buffer("input_resolution", torch.tensor(224))
        def forward(self, x): return x * self.logit_scale
    torch.jit.save(torch.jit.script(Holder()), str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(BadInputError, match="TorchScript.*--convert_openai"):
        clip.read_clip_state_dict(tmp_path / "ViT-B-16.pt")
    ce.clip_cams_main(["--convert_openai", str(tmp_path / "ViT-B-16.pt"), "--out", str(tmp_path / "state.pt")])
    sd = clip.read_clip_state_dict(tmp_path / "state.pt")
    assert list(sd) == ["logit_scale"] and sd["logit_scale"].dtype == torch.float32
    assert list(torch.load(tmp_path / "state.pt", weights_only=True)) == ["logit_scale"]   # plain tensors, no pickle


# ---------------------------------------------------------------- prompts
def test_prompts_are_data_and_toyvoc_uses_its_own_names(model):
    fg, bg = clip.clip_prompts(TOYVOC_CLASSES)
    assert fg == [f"a clean origami {c}." for c in TOYVOC_CLASSES[:3]] + ["a clean origami bird avian."] + \
        [f"a clean origami {c}." for c in TOYVOC_CLASSES[4:]]
    assert len(bg) == 24 and "a clean origami house." not in bg
    t = clip.encode_prompts(model, fg + bg)
    assert t.shape == (30, 512) and t is clip.encode_prompts(model, fg + bg)      # cached per vocabulary
    with pytest.raises(BadInputError): clip.clip_prompts([])


# ---------------------------------------------------------------- algorithm
def test_shapes_ranges_determinism(model):
    imgs, keys = _images(), [[3, 15, 12], [15], [1, 2]]
    a = ce.clip_es_cams(model, imgs, keys, VOC_CLASSES)
    assert [tuple(c.shape) for c in a] == [(3, 4, 6), (1, 4, 6), (2, 7, 3)]
    assert all(c.dtype == torch.float32 and c.min() >= 0 and c.max() <= 1 and c.max() > 0.99 for c in a)
    b = ce.clip_es_cams(model, imgs, keys, VOC_CLASSES, batch_size=1)   # other batching, same numbers
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a, b))
    assert torch.equal(b[0], ce.clip_es_cams(model, imgs[:1], keys[:1], VOC_CLASSES)[0])   # deterministic


def test_batched_backward_equals_per_class_loop(model):
    imgs = [np.random.default_rng(s).integers(0, 256, (64, 96, 3), dtype=np.uint8) for s in range(2)]
    fg, bg = clip.text_features(model, VOC_CLASSES)
    x = torch.stack([clip.preprocess_image(i) for i in imgs])
    keys = [[3, 15, 12], [7]]
    r1 = ce.clip_es_batch(model, x, keys, fg, bg, batched=True)
    r2 = ce.clip_es_batch(model, x, keys, fg, bg, batched=False)
    assert (r1["gradcam"] - r2["gradcam"]).abs().max() <= 1e-5
    assert (r1["cam"] - r2["cam"]).abs().max() <= 1e-5
    assert r1["cam"][1, 1:].abs().max() == 0                             # padded rows are zero


# ---------------------------------------------------------------- parity with the reference CLIP-ES
# An independent re-implementation of the public CLIP-ES pipeline's math, written from the algorithm's
# description (METHOD.md §4 and the issue on parity), not from `pot.clip_es`: the attention comes from
# `nn.MultiheadAttention(need_weights=True)`, the last block is re-run with one autograd backward per class,
# the GradCAM is scaled in numpy, the boxes come from the 8-bit map with `RETR_TREE` contours and the
# reference's border clipping, and T·T is formed explicitly.
def _np_minmax(m):
    "The reference's scaling of one map: subtract the min, divide by the new max + 1e-7, float32."
    m = m - m.min()
    return (m / (1e-7 + m.max())).astype(np.float32)


def _reference_box_mask(cam, threshold=0.4):
    "Union of the reference's boxes: contours of uint8(255 cam) > int(threshold * max), boxes clipped to W-1 / H-1."
    import cv2
    h, w = cam.shape
    u8 = (cam * 255).astype(np.uint8)
    binary = (u8 > int(threshold * u8.max())).astype(np.uint8) * 255
    mask = np.zeros((h, w), np.float32)
    for c in cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]:
        x, y, bw, bh = cv2.boundingRect(c)
        mask[y:min(y + bh, h - 1), x:min(x + bw, w - 1)] = 1
    return mask


def reference_clip_es(model, img, keys, classes, precision="float32"):
    """The reference pipeline's maps for one uint8 image and its labels 1..C: dict(gradcam, refined) on the patch
    grid and `final` at the image size (bilinear, cv2). `precision` is that of the affinity, propagation and final
    min-max: 'float32' as the reference code runs, 'float64' the same math with less rounding."""
    import cv2
    import torch.nn.functional as F
    vis, blocks = model.visual, model.visual.transformer.resblocks
    fg, bg = clip.text_features(model, classes)
    x = clip.preprocess_image(img)[None]
    h, w = x.shape[-2] // 16, x.shape[-1] // 16
    with torch.no_grad():
        t = vis.conv1(x).flatten(2).transpose(1, 2)
        pos = vis.positional_embedding
        g = int(round((pos.shape[0] - 1) ** 0.5))
        grid = F.interpolate(pos[1:].T.reshape(1, -1, g, g), size=(h, w), mode="bilinear", align_corners=False)
        t = vis.ln_pre(torch.cat([vis.class_embedding.expand(1, 1, -1), t], 1) + torch.cat([pos[:1], grid.reshape(pos.shape[1], -1).T]))
        attns = []
        for blk in blocks[:-1]:
            a = blk.ln_1(t)
            o, aw = blk.attn(a, a, a, need_weights=True)          # head-averaged attention
            t = t + o
            t = t + blk.mlp(blk.ln_2(t))
            attns.append(aw)
    text = torch.cat([fg[torch.as_tensor(keys) - 1], bg])
    dt = torch.float32 if precision == "float32" else torch.float64
    blk, out = blocks[-1], dict(gradcam=[], refined=[], final=[])
    for j in range(len(keys)):
        with torch.enable_grad():
            a = blk.ln_1(t).detach().requires_grad_(True)          # the GradCAM layer: the last block's ln_1 output
            o, aw_last = blk.attn(a, a, a, need_weights=True)
            y = t + o
            y = y + blk.mlp(blk.ln_2(y))
            e = vis.ln_post(y)[:, 1:].mean(1) @ vis.proj
            e = e / e.norm(dim=-1, keepdim=True)
            (model.logit_scale.exp() * e @ text.T).softmax(-1)[0, j].backward()
        act, grad = a.detach()[0, 1:].reshape(h, w, -1).numpy(), a.grad[0, 1:].reshape(h, w, -1).numpy()
        cam = np.maximum((grad.mean((0, 1)) * act).sum(-1), 0).astype(np.float32)
        cam = _np_minmax(np.maximum(_np_minmax(cam), 0))            # per layer, then after the mean over layers
        A = torch.stack([aw[0, 1:, 1:] for aw in attns + [aw_last.detach()]])[-8:].mean(0).to(dt)
        T = A
        for _ in range(3):
            T = T / T.sum(0, keepdim=True)
            T = T / T.sum(1, keepdim=True)
        T = (T + T.T) / 2
        T = (T @ T) * torch.from_numpy(_reference_box_mask(cam)).reshape(1, -1).to(dt)   # mask the source columns
        r = (T @ torch.from_numpy(cam).reshape(-1, 1).to(dt)).reshape(h, w).numpy()
        r = r - r.min()
        r = (r / (1e-7 + r.max())).astype(np.float32)
        out["gradcam"].append(cam); out["refined"].append(r)
        out["final"].append(cv2.resize(r, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR))
    return {k: np.stack(v) for k, v in out.items()}


def test_matches_reference_math(model):
    """Default settings reproduce the reference pipeline: GradCAM, refined and final maps within 1e-4 on peaked
    random-weight attention, against the reference's float32 arithmetic and the same math in float64."""
    rng = np.random.default_rng(0)
    for hw, keys in [((60, 90), [3, 15, 12]), ((100, 40), [15]), ((48, 112), [1, 2])]:
        img = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
        x = clip.preprocess_image(img)[None]
        fg, bg = clip.text_features(model, VOC_CLASSES)
        ours = ce.clip_es_batch(model, x, [keys], fg, bg)
        final = ce.upsample_cams(ours["cam"][0], hw).numpy()
        xin, _, grid = clip.vit_trunk(model.visual, x)                   # the GradCAM is scaled twice (scale_gradcam)
        text = torch.cat([fg[torch.as_tensor(keys) - 1], bg])[None]
        raw, _ = clip.last_block_gradcam(model, xin, text, torch.ones(1, text.shape[1], dtype=torch.bool), len(keys))
        torch.testing.assert_close(ours["gradcam"], ce.scale_gradcam(raw.view(1, len(keys), *grid)), rtol=0, atol=1e-6)
        assert (ours["gradcam"] - ce.minmax(raw.view(1, len(keys), *grid))).abs().max() > 1e-6
        for prec in ("float32", "float64"):
            ref = reference_clip_es(model, img, keys, VOC_CLASSES, prec)
            assert np.abs(ours["gradcam"][0].numpy() - ref["gradcam"]).max() <= 1e-4, (hw, prec)
            assert np.abs(ours["cam"][0].numpy() - ref["refined"]).max() <= 1e-4, (hw, prec)
            assert np.abs(final - ref["final"]).max() <= 1e-4, (hw, prec)


def test_reference_scaling_and_box_edges_on_synthetic_cam():
    """The GradCAM is min-max scaled twice (the reference's per-layer and aggregation scalings), which moves the
    8-bit box threshold when the raw range M is not >> 1e-7; boxes stop one row/column short of the right/bottom
    border unless full_box_edges."""
    M, eps = 1e-6, 1e-7
    raw = torch.zeros(1, 5, 5); raw[0, 0, 0] = M; raw[0, 3, 3] = 0.4005 * M
    once = raw / (M + eps)
    twice = once / (M / (M + eps) + eps)                      # divided by its own max + eps once more
    torch.testing.assert_close(ce.scale_gradcam(raw), twice, rtol=1e-6, atol=0)
    assert torch.floor(255 * once.max()) == 231 and torch.floor(255 * twice.max()) == 254
    # 8-bit thresholds floor(0.4 * 231) = 92 and floor(0.4 * 254) = 101: the cell at 0.4005 M is in only the second
    assert ce.cam_box_masks(ce.scale_gradcam(raw))[0].nonzero().tolist() == [[0, 0], [3, 3]]
    assert ce.cam_box_masks(ce.minmax(raw))[0].nonzero().tolist() == [[0, 0]]
    # box edges: a blob touching the bottom-right corner, one touching the top-left
    cam = torch.zeros(1, 6, 8); cam[0, 3:6, 5:8] = 1; cam[0, 0:2, 0:2] = 1
    ref, full = ce.cam_box_masks(cam)[0], ce.cam_box_masks(cam, full_box_edges=True)[0]
    assert ref[0:2, 0:2].all() and full[0:2, 0:2].all() and ref.sum() == 4 + 2 * 2 and full.sum() == 4 + 3 * 3
    assert ref[3:5, 5:7].all() and not ref[5].any() and not ref[:, 7].any() and full[3:6, 5:8].all()
    assert np.array_equal(ref.numpy().astype(np.float32), _reference_box_mask(cam[0].numpy()))
    # the propagation with those boxes on a small synthetic attention, against the reference's explicit T·T
    g = torch.Generator().manual_seed(0)
    A = torch.rand(1, 48, 48, generator=g, dtype=torch.float64) ** 4 + 0.01
    c = ce.scale_gradcam(torch.rand(1, 1, 6, 8, generator=g) ** 3)
    T = ce.attention_affinity(A)[0]
    mask = torch.from_numpy(_reference_box_mask(c[0, 0].numpy())).reshape(1, -1).double()
    expect = ((T @ T) * mask) @ c[0, 0].reshape(-1, 1).double()
    expect = ce.minmax(expect.reshape(1, 1, 6, 8)).float()
    torch.testing.assert_close(ce.refine_cams(T[None], c, ce.cam_box_masks(c)), expect, rtol=0, atol=1e-6)


def test_refinement_keeps_float64_through_the_minmax():
    """On near-uniform attention (the propagated map is a constant plus variations 5e3 times smaller), the
    refinement equals the float64 evaluation of (T·T) v and its min-max to float32 rounding; casting to float32
    before the min-max (as the code once did) is off by about 3e-4."""
    g = torch.Generator().manual_seed(0)
    T = ce.attention_affinity(1 + 0.3 * torch.rand(1, 48, 48, generator=g))
    v = torch.rand(1, 2, 6, 8, generator=g)
    raw = ((T @ T) @ v.flatten(2).transpose(1, 2).double()).transpose(1, 2).reshape(v.shape)
    exact = ce.minmax(raw)
    assert ((raw.amax((-2, -1)) / (raw.amax((-2, -1)) - raw.amin((-2, -1)))) > 1e3).all()     # the stretch
    got = ce.refine_cams(T, v, torch.ones_like(v, dtype=torch.bool))
    assert got.dtype == torch.float32 and (got - exact).abs().max() <= 1e-7
    assert (ce.minmax(raw.float()) - exact).abs().max() > 1e-4


def test_bad_input_messages(model):
    with pytest.raises(BadInputError, match=r"1\.\.20"): ce.clip_es_cams(model, _images(1), [[0]], VOC_CLASSES)
    with pytest.raises(BadInputError, match="distinct"): ce.clip_es_cams(model, _images(1), [[2, 2]], VOC_CLASSES)
    with pytest.raises(BadInputError, match="uint8"): ce.clip_es_cams(model, [np.zeros((8, 8, 3), np.float32)], [[1]], VOC_CLASSES)
    with pytest.raises(BadInputError, match="one per image"): ce.clip_es_cams(model, _images(2), [[1]], VOC_CLASSES)


# ---------------------------------------------------------------- cache
def test_cache_build_read_evaluate(model, toy, tmp_path):
    out = tmp_path / "cache"
    s = ce.build_clip_cache(toy, "train", out, dataset="toyvoc", model=model, batch_size=4, progress=False)
    ds = load_dataset("toyvoc", toy, "train")
    assert (s["n_images"], s["n_computed"], s["n_skipped"]) == (6, 6, 0)
    assert 0 < s["bytes_per_image"] < 5000 and s["projected_coco_train_gb"] < 25
    assert (out / "summary.json").is_file() and load_json(out / ce.CACHE_META)["classes"] == list(TOYVOC_CLASSES)
    n_maps = n_present = 0
    for i in range(len(ds)):
        z = ce.read_clip_cam(out / f"{ds.name(i)}.npz")
        H, W = ds.image(i).shape[:2]
        assert z["cams"].dtype == np.float16 and z["cams"].shape[1:] == (-(-H // 16), -(-W // 16))
        assert sorted(z["keys"].tolist()) == (np.flatnonzero(ds.labels(i)) + 1).tolist() and tuple(z["size"]) == (H, W)
        seed = ce.load_seed_cam(out, ds.name(i), ds.labels(i), (H, W))
        assert seed.shape == (6, H, W) and seed.dtype == np.float32
        present = ds.labels(i) > 0
        assert seed.min() >= 0 and seed.max() <= 1 and seed[~present].max(initial=0) == 0
        # a present class has its map, unless its only boxes lie in the last row/column of these tiny 4x4-ish grids,
        # where the reference's border clipping empties them (the map is then zero; full_box_edges keeps it)
        assert all(seed[c].max() > 0.9 or seed[c].max() == 0 for c in np.flatnonzero(present))
        n_maps += int((seed[present].max((1, 2)) > 0.9).sum()); n_present += int(present.sum())
    assert n_maps >= n_present - 2
    # the same maps as computing them directly
    direct = ce.clip_es_cams(model, [ds.image(0)], [np.flatnonzero(ds.labels(0)) + 1], ds.classes)[0]
    z = ce.read_clip_cam(out / f"{ds.name(0)}.npz")
    assert np.abs(z["cams"].astype(np.float32) - direct.numpy()).max() < 1e-3         # float16 storage
    item = TrainDataset(ds, crop=32, seed_cams=ce.ClipSeedCams(out, ds))[1]
    assert item["seed"].shape == (6, 32, 32)
    r = ce.evaluate_clip_cache(toy, "train", out, dataset="toyvoc", progress=False)
    assert 0 <= r["miou"] <= 100 and r["which"] == "clip-es" and (out / "eval-train.json").is_file()


def test_label_mismatch_and_settings_mismatch_are_errors(model, toy, tmp_path):
    out = tmp_path / "cache"
    ce.build_clip_cache(toy, "train", out, dataset="toyvoc", model=model, limit=2, batch_size=8, progress=False)
    ds = load_dataset("toyvoc", toy, "train")
    wrong = 1 - ds.labels(0)
    with pytest.raises(BadInputError, match="differ from the image's labels"):
        ce.load_seed_cam(out, ds.name(0), wrong, (10, 10))
    ce.write_clip_cam(out / f"{ds.name(1)}.npz", np.arange(1, 7), torch.zeros(6, 4, 3), (64, 48))   # all 6 classes: wrong
    with pytest.raises(BadInputError, match=ds.name(1)):
        ce.build_clip_cache(toy, "train", out, dataset="toyvoc", model=model, limit=2, batch_size=8, progress=False)
    with pytest.raises(BadInputError, match="cache_stride"):
        ce.build_clip_cache(toy, "train", out, dataset="toyvoc", model=model, limit=2, cache_stride=8, progress=False)
    with pytest.raises(BadInputError, match="not a CLIP-ES cache"):
        ce.ClipSeedCams(tmp_path, ds)


def test_cache_stride_and_sharding(model, toy, tmp_path):
    ds = load_dataset("toyvoc", toy, "train")
    out = tmp_path / "s8"
    ce.build_clip_cache(toy, "train", out, dataset="toyvoc", model=model, cache_stride=8, limit=1, batch_size=8, progress=False)
    H, W = ds.image(0).shape[:2]
    assert ce.read_clip_cam(out / f"{ds.name(0)}.npz")["cams"].shape[1:] == (-(-H // 8), -(-W // 8))
    sh = tmp_path / "shards"
    a = ce.build_clip_cache(toy, "train", sh, dataset="toyvoc", model=model, rank=0, world_size=2, batch_size=8, progress=False)
    files_a = {p.name for p in sh.glob("*.npz")}
    b = ce.build_clip_cache(toy, "train", sh, dataset="toyvoc", model=model, rank=1, world_size=2, batch_size=8, progress=False)
    assert (a["n_images"], b["n_images"]) == (3, 3) and len(files_a) == 3
    assert {p.name for p in sh.glob("*.npz")} == {f"{n}.npz" for n in ds.ids}
    assert (sh / "summary-rank0.json").is_file() and (sh / "summary-rank1.json").is_file()
    with pytest.raises(BadInputError, match="rank"): ce.build_clip_cache(toy, "train", sh, dataset="toyvoc", model=model, rank=2, world_size=2)


def test_resume_after_killed_run(toy, tmp_path):
    """A real `pot-clip-cams` process is killed (SIGKILL) mid-run; the rerun keeps the complete files,
    rewrites a corrupted one and removes the dead writer's temp file."""
    out = tmp_path / "cache"
    code = ("import pot.clip_es as ce, time; orig = ce.write_clip_cam\n"
            "def slow(*a, **k):\n    time.sleep(0.2); return orig(*a, **k)\n"
            "ce.write_clip_cam = slow\n"
            f"ce.clip_cams_cli(['--data_root', {str(toy)!r}, '--dataset', 'toyvoc', '--split', 'train', "
            f"'--out', {str(out)!r}, '--pretrained', 'none', '--device', 'cpu'])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while len(list(out.glob("*.npz"))) < 2 and time.time() - t0 < 90 and p.poll() is None: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    done = sorted(out.glob("*.npz"))
    assert 2 <= len(done) < 6, f"expected a partial cache, found {len(done)} files ({p.stderr.read()[-500:]!r})"
    (out / f".{done[-1].stem}.npz.abc123.tmp").write_bytes(b"half a file")      # a torn write left behind
    n_before = len(done)
    done[0].write_bytes(done[0].read_bytes()[:40])                                 # a corrupted file
    keep = {p.name: p.stat().st_mtime_ns for p in done[1:]}
    m = clip.load_clip(None, seed=0)                                                  # the killed run's weights
    s = ce.build_clip_cache(toy, "train", out, dataset="toyvoc", pretrained=None, model=m, batch_size=8, progress=False)
    assert s["n_computed"] == 6 - n_before + 1 and s["n_skipped"] == n_before - 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name in keep} == keep
    ce.read_clip_cam(done[0])                                                        # rewritten, readable
    assert not list(out.glob(".*.tmp"))


def test_cli_builds_and_evaluates(model, toy, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(ce, "load_clip", lambda pretrained, device, seed=0: calls.append((pretrained, seed)) or model)
    s = ce.clip_cams_main(["--data_root", str(toy), "--dataset", "toyvoc", "--split", "val", "--out", str(tmp_path / "c"),
                          "--pretrained", "none", "--device", "cpu", "--eval", "--batch_size", "2", "--seed", "3"])
    assert calls == [(None, 3)] and s["n_images"] == 2 and "miou" in s["eval"]
    assert "CAM mIoU" in capsys.readouterr().out


def test_cli_full_box_edges_is_a_recorded_setting(model, toy, tmp_path, monkeypatch):
    "--full_box_edges reaches the algorithm and the cache's settings; resuming without it is an error."
    monkeypatch.setattr(ce, "load_clip", lambda pretrained, device, seed=0: model)
    args = ["--data_root", str(toy), "--dataset", "toyvoc", "--out", str(tmp_path / "c"), "--pretrained", "none",
            "--device", "cpu", "--limit", "2"]
    ce.clip_cams_main(args + ["--full_box_edges", "true"])
    settings = load_json(tmp_path / "c" / ce.CACHE_META)["settings"]
    assert settings["full_box_edges"] is True and settings["format"] == 2
    ds = load_dataset("toyvoc", toy, "train")
    keys = [np.flatnonzero(ds.labels(i)) + 1 for i in range(2)]
    full = ce.clip_es_cams(model, [ds.image(i) for i in range(2)], keys, ds.classes, full_box_edges=True)
    for i in range(2):
        np.testing.assert_allclose(ce.read_clip_cam(tmp_path / "c" / f"{ds.name(i)}.npz")["cams"], full[i].numpy(), atol=5e-4)
    with pytest.raises(BadInputError, match="full_box_edges"): ce.clip_cams_main(args)


def test_cli_reports_bad_input_without_traceback(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(clip, "_openai_weights_file", lambda: (_ for _ in ()).throw(OSError("offline")))
    assert "pretrained='openai'" in cli_error(ce.clip_cams_cli, ["--data_root", str(toy), "--dataset", "toyvoc", "--out", str(tmp_path / "c")], capsys)
    assert "no split file" in cli_error(ce.clip_cams_cli, ["--data_root", str(tmp_path), "--out", str(tmp_path / "c"), "--pretrained", "none"], capsys)


def _parity_report():
    """The parity table of nbs/12_clip_es.ipynb: max |ours - reference| on 5 images, 1-3 classes, two random models.
    Run: OMP_NUM_THREADS=1 python tests/test_clip_es.py  (about 2 minutes on one CPU thread)."""
    import json
    torch.set_num_threads(1)
    sizes = [((60, 90), [3, 15, 12]), ((100, 40), [15]), ((224, 224), [1, 2]), ((161, 239), [7, 9, 20]), ((375, 500), [5, 11])]
    cast_first = lambda T, cams, masks: ce.minmax((T @ (T @ (cams * masks).flatten(2).transpose(1, 2).to(T.dtype)))
                                                  .transpose(1, 2).reshape(cams.shape).float())      # the old refine_cams
    for kind in ("peaked", "default"):
        m = clip.load_clip(None, "cpu", seed=0)
        if kind == "peaked":
            for b in m.visual.transformer.resblocks: b.attn.in_proj_weight[:2 * 768] *= 4
        fg, bg = clip.text_features(m, VOC_CLASSES)
        rng = np.random.default_rng(0)
        for hw, keys in sizes:
            img = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
            x = clip.preprocess_image(img)[None]
            ours, loop = (ce.clip_es_batch(m, x, [keys], fg, bg, batched=b) for b in (True, False))
            refine, ce.refine_cams = ce.refine_cams, cast_first
            try: old, old_loop = (ce.clip_es_batch(m, x, [keys], fg, bg, batched=b)["cam"] for b in (True, False))
            finally: ce.refine_cams = refine
            grid = ours["cam"][0]
            final, cached = ce.upsample_cams(grid, hw).numpy(), ce.upsample_cams(grid.numpy().astype(np.float16), hw).numpy()
            r32, r64 = (reference_clip_es(m, img, keys, VOC_CLASSES, p) for p in ("float32", "float64"))
            d = lambda a, b: float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
            row = dict(model=kind, size=hw, classes=len(keys), gradcam=d(ours["gradcam"][0], r32["gradcam"]),
                       refined_vs_ref32=d(grid, r32["refined"]), refined_vs_ref64=d(grid, r64["refined"]),
                       final_vs_ref32=d(final, r32["final"]), final_vs_ref64=d(final, r64["final"]),
                       ref32_vs_ref64=d(r32["refined"], r64["refined"]),
                       cache_vs_ref32_final=d(cached, r32["final"]), cache_vs_ref32_file=d(cached, r32["final"].astype(np.float16)),
                       batched_vs_loop=d(ours["cam"], loop["cam"]), batched_vs_loop_cast_first=d(old, old_loop))
            print(json.dumps({k: (f"{v:.1e}" if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    _parity_report()
