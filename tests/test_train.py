"""End-to-end tests of stage 1 (`pot.train`): 2-process DDP vs one process, run-folder contents, clear errors (exact
resume after SIGKILL: `test_resume.py`). Tiny settings (24 ToyVOC images of 96 px, ResNet-18, 64-px crops,
feature_stride 8) keep the whole file around a minute or two on a busy 2-core CPU.

Training runs in subprocesses launched through the `pot-train` command line (`pot.train.train_cli`), with
one intra-op thread each (OMP_NUM_THREADS=1): the runs compared bit for bit then use the same kernels
and reduction order.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import POT_TINY as TINY, pot_flags as flags, run_cli
from helpers import subprocess_env
from pot.core import BadInputError, POTConfig, load_checkpoint, load_json, read_jsonl, save_json, save_npz
from pot.runs import Run

@pytest.fixture(scope="module")
def toy(make_toyvoc):
    "A tiny ToyVOC: 24 train images of 96 px (6 steps per epoch at batch 4), the one of `pot_reference`."
    return make_toyvoc(n_train=24, n_val=4, size=96)


@pytest.fixture(scope="module")
def reference(pot_reference):
    "An uninterrupted tiny run (12 steps; conftest)."
    return pot_reference


def test_run_folder_contents(reference):
    run = Path(reference["out_dir"])
    stored = load_json(run / "config.json")
    cfg = POTConfig(**reference)
    assert stored["config"] == cfg.to_dict()
    assert stored["env"]["packages"]["torch"] and "git_commit" in stored["env"] and stored["env"]["world_size"] == 1
    assert stored["steps_per_epoch"] == 6 and stored["total_steps"] == 12
    log = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in log] == list(range(1, 13)) and [r["epoch"] for r in log] == [0] * 6 + [1] * 6
    for r in log:
        assert {"loss", "loss_cls", "loss_con", "lr", "grad_norm", "sec_per_step", "n_empty"} <= set(r)
        assert abs(r["loss"] - (r["loss_cls"] + 1.0 * r["loss_con"])) < 1e-5
    lrs = [r["lr"] for r in log]
    assert lrs[0] == 0.01 and all(x > y for x, y in zip(lrs, lrs[1:]))
    assert not (run / "ckpt" / "last.pt").exists() and (run / "ckpt" / "final.pt").exists()
    from pot.train import load_trained
    model, cfg2 = load_trained(run)
    assert cfg2 == cfg and model.num_classes == 6 and not model.training


def test_finished_run_is_verified_and_takes_runtime_fields(reference, tmp_path):
    "A truncated final.pt is not a finished run, a torn last.pt says how to start over (regressions); a copied run folder is the same run."
    import shutil
    from pot.train import train
    moved = tmp_path / "moved"
    shutil.copytree(reference["out_dir"], moved)
    cfg = POTConfig(**dict(reference, out_dir=str(moved), cam_scales=[1.0, 0.5], pot_scales=[0.5]))
    assert train(cfg) == moved                                  # another out_dir and other inference scales: the same run
    assert load_json(moved / "config.json")["config"]["pot_scales"] == [0.5]     # what this call asked for
    final = moved / "ckpt" / "final.pt"
    final.write_bytes(final.read_bytes()[:2000])                # torn: used to be reported as finished (exit 0)
    with pytest.raises(BadInputError, match=r"final.pt.*resume=False \(--no-resume\)"): train(cfg)
    final.unlink()
    (moved / "ckpt" / "last.pt").write_bytes(b"torn")
    with pytest.raises(BadInputError, match=r"last.pt.*resume=False \(--no-resume\)"): train(cfg)


def test_two_processes_match_one(toy, tmp_path):
    """2 gloo processes with 2 images each vs 1 process with the global batch of 4, 6 steps, with the paper's recipe.

    Frozen BN (`freeze_stem_bn=True`; trainable BN would normalise each process's half-batch on its own) makes every image's forward pass independent of the others, DDP averages the two halves'
    gradients, and the consistency loss is normalised over the global batch (`global_weight_share`), so
    both runs compute the same update up to float32 summation order (per-rank partial sums, then an
    all-reduce; ~1e-7 relative). Step 1 (same weights) must agree to 1e-5 relative. Later steps follow
    the same trajectory but the rounding differences are amplified by the updates (lr 0.01/0.1, clipped
    gradients of norm ~10-20), and the POT head has discrete steps (confident sets at tau, the Sinkhorn
    iteration at which a problem's change of Q drops below its tolerance) that a rounding difference can
    cross: measured with the Q stop rule, steps 1-2 agree to 1e-6, then a crossing at step 3 moves
    loss_con by 1.2e-4 relative and by step 6 the logged losses differ by up to 3e-2 (loss_con) and 6e-3
    (loss_cls) while the weights still agree to 3e-4. So step 1 is held to 1e-5, later steps to 1e-2
    (loss_cls, loss) and 5e-2 (loss_con), and the final weights to 1e-3 absolute. K=1 because with
    K>1 k-means++ draws its initial centres in batch order from one generator per process, so the two
    runs would start k-means from different centres (a difference of method randomness, not of DDP).
    """
    base = dict(TINY, dataset="toyvoc", data_root=str(toy), epochs=1, K=1, ckpt_every=100, optimizer="sgd", freeze_stem_bn=True)
    one = dict(base, out_dir=str(tmp_path / "one"))
    two = dict(base, out_dir=str(tmp_path / "two"))
    run_cli("pot", flags(one))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "pot.train", *flags(two)], env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert load_json(tmp_path / "two" / "config.json")["env"]["world_size"] == 2
    a, b = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        for k in ("loss", "loss_cls", "loss_con"):
            rel = 1e-5 if ra["step"] == 1 else {"loss_con": 5e-2}.get(k, 1e-2)
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-6), (ra["step"], k, ra[k], rb[k])
    wa, wb = (load_checkpoint(Run(tmp_path / r).final_ckpt)["model"] for r in ("one", "two"))
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) < 1e-3


def test_clear_errors(toy, tmp_path):
    from pot.train import train
    base = dict(TINY, dataset="toyvoc", data_root=str(toy))
    with pytest.raises(BadInputError, match="pretrained="):
        train(POTConfig(**dict(base, out_dir=str(tmp_path / "w"), pretrained=str(tmp_path / "resnet18.pth"))))
    clip = dict(base, seed_source="clip-es", out_dir=str(tmp_path / "c"))
    with pytest.raises(BadInputError, match="seed_dir"):
        train(POTConfig(**clip))
    with pytest.raises(BadInputError, match="no such folder"):
        train(POTConfig(**clip, seed_dir=str(tmp_path / "nocache")))
    cache = tmp_path / "cache"; cache.mkdir()
    with pytest.raises(BadInputError, match="no seed CAM for 24 of 24"):
        train(POTConfig(**clip, seed_dir=str(cache)))


def test_bad_seed_cache(toy, tmp_path):
    pytest.importorskip("pot.clip_es")
    from pot.train import train
    clip = dict(TINY, dataset="toyvoc", data_root=str(toy), seed_source="clip-es", out_dir=str(tmp_path / "c"))
    cache = tmp_path / "cache"; cache.mkdir()
    ids = (Path(toy) / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    for n in ids: (cache / f"{n}.npz").write_bytes(b"not a zip")     # a corrupt cache
    with pytest.raises(BadInputError, match="pot-clip-cams"):          # ... without its class list
        train(POTConfig(**clip, seed_dir=str(cache)))
    save_json(cache / "clip_es.json", {"classes": ["car", "flower", "fish", "bird", "house", "boat"]})
    with pytest.raises(BadInputError, match=r"\.npz"):
        train(POTConfig(**clip, seed_dir=str(cache)))
    for n in ids:   # wrong classes: every image claims class 7 (ToyVOC has 6)
        save_npz(cache / f"{n}.npz", keys=torch.tensor([7]).numpy(), cams=torch.zeros(1, 8, 8).half().numpy(),
                 size=torch.tensor([96, 96]).numpy())
    with pytest.raises(BadInputError, match="differ from the image's labels"):
        train(POTConfig(**clip, seed_dir=str(cache)))


def test_resume_refuses_other_parameters(reference):
    from pot.train import train
    cfg = {k: v for k, v in reference.items()}
    with pytest.raises(BadInputError, match="tau"):
        train(POTConfig(**{**cfg, "tau": 0.5}))


def test_clip_seeds_train(toy, tmp_path):
    "A valid CLIP-ES cache (here written from the ground-truth masks) trains with seed_source='clip-es'."
    clip_es = pytest.importorskip("pot.clip_es")
    from pot.data import load_dataset
    from pot.train import train
    ds = load_dataset("toyvoc", toy, "train")
    cache = tmp_path / "cache"
    for i in range(len(ds)):
        m, keys = torch.from_numpy(ds.mask(i)), torch.from_numpy(ds.labels(i)).nonzero()[:, 0] + 1
        clip_es.write_clip_cam(clip_es.cache_file(cache, ds.name(i)), keys.numpy(), (m[None] == keys[:, None, None]).float(),
                               tuple(m.shape))
    save_json(cache / clip_es.CACHE_META, {"classes": list(ds.classes)})
    run = train(POTConfig(**dict(TINY, epochs=1, ckpt_every=100), dataset="toyvoc", data_root=str(toy),
                          seed_source="clip-es", seed_dir=str(cache), out_dir=str(tmp_path / "run")))
    log = read_jsonl(run / "metrics.jsonl")
    assert len(log) == 6 and all(r["loss_con"] > 0 for r in log)


def test_console_scripts_report_bad_input_on_one_line(tmp_path, capsys):
    "pot-train, pot-irn and pot-deeplab end on bad input with `error: ...` and exit status 2, no traceback (they used to print 20-55 lines)."
    from helpers import cli_error
    from pot.train import train_cli
    from pot.irn import irn_cli
    from pot.deeplab import deeplab_cli
    assert "POTConfig.K=0" in cli_error(train_cli, ["--K", "0"], capsys)
    assert "POTConfig.tau=1.5" in cli_error(train_cli, ["--tau", "1.5"], capsys)
    assert "no such folder" in cli_error(train_cli, ["--data_root", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "r")], capsys)
    assert "error: " in cli_error(irn_cli, ["--run_dir", str(tmp_path / "nope")], capsys)
    assert "error: " in cli_error(deeplab_cli, ["--label_dir", str(tmp_path / "nope"), "--out_dir", str(tmp_path / "s"),
                                                "--data_root", str(tmp_path / "nope")], capsys)


def test_training_step_same_with_the_static_head():
    "The training step's losses through the GPU path (POTHead, eager here) equal those through pot_cams, padding included."
    from pot.activation import POTHead
    from pot.train import pot_step_losses
    torch.manual_seed(0)
    N, C, h, w = 3, 4, 16, 16
    out = dict(logits=torch.randn(N, C), cams=torch.rand(N, C, 4, 4, requires_grad=True),
               F=torch.nn.functional.normalize(torch.randn(N, 32, h, w), dim=1).requires_grad_())
    labels = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float32)
    valid = torch.ones(N, 64, 64, dtype=torch.bool); valid[1, :, 48:] = False       # the second crop is padded
    for detach in (True, False):
        cfg = POTConfig(detach_pot=detach, con_warmup=0.0)
        ref = pot_step_losses(out, labels, valid, cfg, generator=torch.Generator().manual_seed(1))
        got = pot_step_losses(out, labels, valid, cfg, generator=torch.Generator().manual_seed(1), head=POTHead(compile=False))
        for k in ("loss", "loss_cls", "loss_con"): assert float(got[k].detach()) == pytest.approx(float(ref[k].detach()), abs=1e-5), (detach, k)
        g_ref = torch.autograd.grad(ref["loss"], out["cams"], retain_graph=True)[0]
        g_got = torch.autograd.grad(got["loss"], out["cams"])[0]
        torch.testing.assert_close(g_got, g_ref, atol=1e-5, rtol=0)
