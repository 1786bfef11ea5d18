"""CLIP-ES seed CAMs (pot.clip_es): weights, prompts, the batched algorithm, the cache and its resume.

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
from pot.data import VOC_CLASSES, TrainDataset, load_dataset
from pot.toyvoc import TOYVOC_CLASSES, generate_toyvoc
import pot.clip_es as ce

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model():
    m = ce.load_clip(None, "cpu", seed=0)
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
    assert ce.clip_model_name() == "ViT-B-16-quickgelu" and ce.clip_model_name(quick_gelu=False) == "ViT-B-16"
    assert model.pot_clip["name"] == "ViT-B-16-quickgelu"
    for tower in (model.visual.transformer, model.transformer):
        assert all(isinstance(b.mlp.gelu, QuickGELU) for b in tower.resblocks)


def test_openai_offline_error_names_the_file_to_pass(monkeypatch):
    def offline(): raise OSError("no network")
    monkeypatch.setattr(ce, "_openai_weights_file", offline)
    with pytest.raises(BadInputError) as e: ce.load_clip("openai")
    msg = str(e.value)
    assert "pretrained=" in msg and "--convert-openai" in msg and "ViT-B-16.pt" in msg and "open_clip_pytorch_model.bin" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ce._hub_reachable() is False                      # no network call when offline is declared


def test_load_state_dict_in_openai_format(model, tmp_path):
    w = "visual.transformer.resblocks.3.mlp.c_fc.weight"
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}   # OpenAI ships fp16
    sd[w] = sd[w] + 1                                                   # so that loading is visible
    sd.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    save_checkpoint(tmp_path / "openai_format.pt", sd)
    m = ce.load_clip(tmp_path / "openai_format.pt")
    assert m.pot_clip["name"] == "ViT-B-16-quickgelu"
    assert torch.equal(m.state_dict()[w], sd[w].float())
    assert m.state_dict()[w].dtype == torch.float32 and not any(p.requires_grad for p in m.parameters())


def test_open_clip_wrapper_and_bad_keys(tmp_path):
    save_checkpoint(tmp_path / "wrapped.pt", {"state_dict": {"module.logit_scale": torch.ones(())}, "epoch": 3})
    assert list(ce.read_clip_state_dict(tmp_path / "wrapped.pt")) == ["logit_scale"]
    with pytest.raises(BadInputError, match="missing key"): ce.load_clip(tmp_path / "wrapped.pt")
    with pytest.raises(BadInputError, match="file not found"): ce.load_clip(tmp_path / "nope.pt")


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
def test_torchscript_is_refused_and_converted_once(tmp_path):
    class Holder(torch.nn.Module):                              # a TorchScript archive shaped like OpenAI's
        def __init__(self):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.ones((), dtype=torch.float16))
            self.register_buffer("input_resolution", torch.tensor(224))
        def forward(self, x): return x * self.logit_scale
    torch.jit.save(torch.jit.script(Holder()), str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(BadInputError, match="TorchScript.*--convert-openai"):
        ce.read_clip_state_dict(tmp_path / "ViT-B-16.pt")
    ce.clip_cams_main(["--convert-openai", str(tmp_path / "ViT-B-16.pt"), "--out", str(tmp_path / "state.pt")])
    sd = ce.read_clip_state_dict(tmp_path / "state.pt")
    assert list(sd) == ["logit_scale"] and sd["logit_scale"].dtype == torch.float32
    assert list(torch.load(tmp_path / "state.pt", weights_only=True)) == ["logit_scale"]   # plain tensors, no pickle


# ---------------------------------------------------------------- prompts
def test_prompts_are_data_and_toyvoc_uses_its_own_names(model):
    fg, bg = ce.clip_prompts(TOYVOC_CLASSES)
    assert fg == [f"a clean origami {c}." for c in TOYVOC_CLASSES[:3]] + ["a clean origami bird avian."] + \
        [f"a clean origami {c}." for c in TOYVOC_CLASSES[4:]]
    assert len(bg) == 24 and "a clean origami house." not in bg
    t = ce.encode_prompts(model, fg + bg)
    assert t.shape == (30, 512) and t is ce.encode_prompts(model, fg + bg)      # cached per vocabulary
    with pytest.raises(BadInputError): ce.clip_prompts([])


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
    fg, bg = ce.text_features(model, VOC_CLASSES)
    x = torch.stack([ce.preprocess_image(i) for i in imgs])
    keys = [[3, 15, 12], [7]]
    r1 = ce.clip_es_batch(model, x, keys, fg, bg, batched=True)
    r2 = ce.clip_es_batch(model, x, keys, fg, bg, batched=False)
    assert (r1["gradcam"] - r2["gradcam"]).abs().max() <= 1e-5
    assert (r1["cam"] - r2["cam"]).abs().max() <= 1e-5
    assert r1["cam"][1, 1:].abs().max() == 0                             # padded rows are zero


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
    for i in range(len(ds)):
        z = ce.read_clip_cam(out / f"{ds.name(i)}.npz")
        H, W = ds.image(i).shape[:2]
        assert z["cams"].dtype == np.float16 and z["cams"].shape[1:] == (-(-H // 16), -(-W // 16))
        assert sorted(z["keys"].tolist()) == (np.flatnonzero(ds.labels(i)) + 1).tolist() and tuple(z["size"]) == (H, W)
        seed = ce.load_seed_cam(out, ds.name(i), ds.labels(i), (H, W))
        assert seed.shape == (6, H, W) and seed.dtype == np.float32
        assert (seed.max((1, 2)) > 0.9).tolist() == (ds.labels(i) > 0).tolist() and seed.min() >= 0 and seed.max() <= 1
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
            f"ce.clip_cams_cli(['--data-root', {str(toy)!r}, '--dataset', 'toyvoc', '--split', 'train', "
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
    m = ce.load_clip(None, seed=0)                                                  # the killed run's weights
    s = ce.build_clip_cache(toy, "train", out, dataset="toyvoc", pretrained=None, model=m, batch_size=8, progress=False)
    assert s["n_computed"] == 6 - n_before + 1 and s["n_skipped"] == n_before - 1
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz") if p.name in keep} == keep
    ce.read_clip_cam(done[0])                                                        # rewritten, readable
    assert not list(out.glob(".*.tmp"))


def test_cli_builds_and_evaluates(model, toy, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(ce, "load_clip", lambda pretrained, device, seed=0: calls.append((pretrained, seed)) or model)
    s = ce.clip_cams_main(["--data-root", str(toy), "--dataset", "toyvoc", "--split", "val", "--out", str(tmp_path / "c"),
                          "--pretrained", "none", "--device", "cpu", "--eval", "--batch-size", "2", "--seed", "3"])
    assert calls == [(None, 3)] and s["n_images"] == 2 and "miou" in s["eval"]
    assert "CAM mIoU" in capsys.readouterr().out


def test_cli_reports_bad_input_without_traceback(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(ce, "_openai_weights_file", lambda: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SystemExit, match="pot-clip-cams: error: pretrained='openai'"):
        ce.clip_cams_cli(["--data-root", str(toy), "--dataset", "toyvoc", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="no split file"):
        ce.clip_cams_cli(["--data-root", str(tmp_path), "--out", str(tmp_path / "c"), "--pretrained", "none"])
