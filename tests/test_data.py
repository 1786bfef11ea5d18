"""Readers of pot.data on a generated ToyVOC and on deliberately broken copies of it; ToyVOC determinism."""
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pot.core import BadInputError, load_json
from pot.data import IMAGENET_MEAN, IMAGENET_STD, VOCLayout, load_dataset, make_train_aug, read_split, write_split
from pot.datasets import InferDataset, TrainDataset
from pot.toyvoc import TOYVOC_CLASSES, ensure_toyvoc, generate_toyvoc, toyvoc_cli
from pot.data import save_palette_png
from helpers import cli_error

N_TRAIN, N_VAL, SIZE = 10, 4, 96


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    return generate_toyvoc(tmp_path_factory.mktemp("toy") / "toyvoc", n_train=N_TRAIN, n_val=N_VAL, size=SIZE, progress=False)


@pytest.fixture
def copy(toy, tmp_path):
    "A fresh copy of the small ToyVOC to break."
    dst = tmp_path / "broken"
    shutil.copytree(toy, dst)
    return dst


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


# --- readers on a good dataset ------------------------------------------------------------------------------

def test_reader_on_toyvoc(toy):
    ds = load_dataset("toyvoc", toy, "train")
    assert len(ds) == N_TRAIN and ds.classes == list(TOYVOC_CLASSES) and ds.num_classes == len(TOYVOC_CLASSES)
    assert ds.label_source == "xml"
    for i in range(len(ds)):
        img, m, y = ds.image(i), ds.mask(i), ds.labels(i)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and max(img.shape[:2]) == SIZE
        assert m.dtype == np.uint8 and m.shape == img.shape[:2]
        assert set(np.unique(m)) <= set(range(len(TOYVOC_CLASSES) + 1)) | {255}
        assert (m == 255).any(), "ToyVOC masks carry a 255 band on object borders"
        assert y.dtype == np.float32 and y.shape == (ds.num_classes,) and 1 <= y.sum() <= 3
    assert len(load_dataset("toyvoc", toy, "val")) == N_VAL


def test_labels_from_xml_equal_labels_from_masks(toy):
    for split in ("train", "val"):
        xml = VOCLayout(toy, split, label_source="xml", cache=False).label_matrix
        msk = VOCLayout(toy, split, label_source="mask", cache=False).label_matrix
        np.testing.assert_array_equal(xml, msk)


def test_label_cache_follows_the_split(copy):
    ds = VOCLayout(copy, "train")
    full = ds.label_matrix
    cache = copy / "ImageSets/Segmentation/train.labels.npz"
    assert cache.is_file()
    write_split(copy / "ImageSets/Segmentation/train.txt", ds.ids[::-1][:5])
    np.testing.assert_array_equal(VOCLayout(copy, "train").label_matrix, full[::-1][:5])


def test_split_formats_and_train_aug(tmp_path):
    (tmp_path / "a.txt").write_text("/JPEGImages/x1.jpg /SegmentationClassAug/x1.png\nx2.jpg\n")
    assert read_split(tmp_path / "a.txt") == (["x1", "x2"], None)
    (tmp_path / "b.txt").write_text("im1 0 3\nim2 5\n")
    assert read_split(tmp_path / "b.txt") == (["im1", "im2"], [[0, 3], [5]])
    (tmp_path / "c.txt").write_text("im1 cat\n")
    with pytest.raises(BadInputError, match="c.txt"): read_split(tmp_path / "c.txt")
    (tmp_path / "d.txt").write_text("im1\nim1\n")
    with pytest.raises(BadInputError, match="more than once"): read_split(tmp_path / "d.txt")
    ids = make_train_aug(["a", "b", "c"], ["d", "b"], ["c"], voc_train=["e"], out=tmp_path / "train_aug.txt")
    assert ids == ["a", "b", "d", "e"] and read_split(tmp_path / "train_aug.txt")[0] == ids


# --- broken copies: each a BadInputError naming the file -----------------------------------------------------

def test_deleted_image(copy):
    (copy / "JPEGImages/train_00003.jpg").unlink()
    with pytest.raises(BadInputError, match="train_00003"): VOCLayout(copy, "train")


def test_split_with_unknown_id(copy):
    with open(copy / "ImageSets/Segmentation/val.txt", "a") as f: f.write("no_such_image\n")
    with pytest.raises(BadInputError, match=r"val\.txt.*no_such_image"): VOCLayout(copy, "val")


def test_corrupt_image(copy):
    p = copy / "JPEGImages/train_00001.jpg"
    p.write_bytes(p.read_bytes()[:200])
    ds = VOCLayout(copy, "train")
    with pytest.raises(BadInputError, match="train_00001.jpg"): ds.image(1)


def test_corrupt_png(copy):
    (copy / "SegmentationClass/train_00002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = VOCLayout(copy, "train")
    with pytest.raises(BadInputError, match="train_00002.png"): ds.mask(2)


def test_missing_mask(copy):
    (copy / "SegmentationClass/train_00002.png").unlink()
    with pytest.raises(BadInputError, match="train_00002.png"): VOCLayout(copy, "train").mask(2)


def test_mask_out_of_range(copy):
    p = copy / "SegmentationClass/train_00004.png"
    m = np.array(Image.open(p))
    m[0, 0] = 9
    save_palette_png(p, m)
    ds = VOCLayout(copy, "train")
    with pytest.raises(BadInputError, match=r"train_00004.png.*\[9\]"): ds.mask(4)
    with pytest.raises(BadInputError, match="train_00004.png"): VOCLayout(copy, "train", label_source="mask", cache=False).label_matrix


def test_mask_of_wrong_size(copy):
    save_palette_png(copy / "SegmentationClass/train_00000.png", np.zeros((5, 7), np.uint8))
    with pytest.raises(BadInputError, match="train_00000.png"): VOCLayout(copy, "train").mask(0)


def test_corrupt_xml(copy):
    (copy / "Annotations/train_00005.xml").write_text("<annotation><object><name>car</name>")
    with pytest.raises(BadInputError, match="train_00005.xml"): VOCLayout(copy, "train", cache=False).label_matrix


def test_missing_xml_and_unknown_class(copy):
    (copy / "Annotations/train_00006.xml").unlink()
    with pytest.raises(BadInputError, match="train_00006.xml"): VOCLayout(copy, "train", cache=False).label_matrix
    (copy / "Annotations/val_00000.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(BadInputError, match="unicorn"): VOCLayout(copy, "val", cache=False).label_matrix


def test_missing_classes_txt(copy):
    (copy / "classes.txt").unlink()
    with pytest.raises(BadInputError, match="classes.txt"): VOCLayout(copy, "train")
    with pytest.raises(BadInputError, match="classes.txt"): load_dataset("toyvoc", copy, "train")
    assert load_dataset("voc", copy, "train").num_classes == 20   # VOC falls back to its 20 names


def test_missing_split(toy):
    with pytest.raises(BadInputError, match="test.txt"): VOCLayout(toy, "test")


# --- ToyVOC generation --------------------------------------------------------------------------------------

def test_generation_is_deterministic(toy, tmp_path):
    again = generate_toyvoc(tmp_path / "again", n_train=N_TRAIN, n_val=N_VAL, size=SIZE, progress=False)
    a, b = _digest(toy), _digest(again)
    a = {k: v for k, v in a.items() if not k.endswith(".labels.npz")}   # label caches written by other tests
    assert a == b
    other = generate_toyvoc(tmp_path / "other", n_train=2, n_val=0, size=SIZE, seed=1, progress=False)
    assert (other / "JPEGImages/train_00000.jpg").read_bytes() != (toy / "JPEGImages/train_00000.jpg").read_bytes()


def test_ensure_and_cli(tmp_path, capsys):
    out = tmp_path / "t"
    toyvoc_cli(["--out", str(out), "--n_train", "3", "--n_val", "1", "--size", "64", "--quiet"])
    stamp = (out / "toyvoc.json").stat().st_mtime_ns
    ensure_toyvoc(out, n_train=3, n_val=1, size=64, progress=False)
    assert (out / "toyvoc.json").stat().st_mtime_ns == stamp              # complete: left alone
    (out / "Annotations/train_00001.xml").unlink()
    ensure_toyvoc(out, n_train=3, n_val=1, size=64, progress=False)      # incomplete: regenerated
    assert (out / "Annotations/train_00001.xml").is_file()
    toyvoc_cli(["--out", str(out), "--n_train", "3", "--n_val", "1", "--size", "64", "--quiet"])
    assert "up to date" in capsys.readouterr().out


# --- training and inference datasets ------------------------------------------------------------------------

def test_train_dataset_is_deterministic(toy):
    ds = load_dataset("toyvoc", toy, "train")
    a, b = TrainDataset(ds, crop=64, seed=5), TrainDataset(ds, crop=64, seed=5)
    for i in (0, 3):
        x, y = a[i], b[i]
        assert torch.equal(x["img"], y["img"]) and torch.equal(x["valid"], y["valid"])
        assert x["img"].shape == (3, 64, 64) and x["img"].dtype == torch.float32 and x["valid"].dtype == torch.bool
        np.testing.assert_array_equal(x["label"].numpy(), ds.labels(i))
    loader = torch.utils.data.DataLoader(a, batch_size=4, num_workers=0)
    batch = next(iter(loader))
    assert batch["img"].shape == (4, 3, 64, 64) and batch["label"].shape == (4, len(TOYVOC_CLASSES))
    assert not torch.equal(TrainDataset(ds, crop=64, seed=6)[0]["img"], a[0]["img"])
    a.set_epoch(1)
    assert not torch.equal(a[0]["img"], b[0]["img"])
    b.set_epoch(1)
    assert torch.equal(a[0]["img"], b[0]["img"])


def test_seed_cams_follow_the_image_geometry(toy):
    "Seed maps built from the image itself must, after augmentation, still equal the augmented image."
    ds = load_dataset("toyvoc", toy, "train")
    C = ds.num_classes

    def seed_cams(name, hw):
        img = ds.image(ds.ids.index(name)).astype(np.float32) / 255
        assert img.shape[:2] == hw
        return np.stack([img[..., c % 3] for c in range(C)])

    tds = TrainDataset(ds, crop=112, seed=2, scale=(0.7, 1.3), seed_cams=seed_cams, with_mask=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for epoch in (0, 1):
        tds.set_epoch(epoch)
        for i in range(len(ds)):
            it = tds[i]
            rgb, v = it["img"] * std + mean, it["valid"]
            assert it["seed"].shape == (C, 112, 112)
            for c in range(C):
                torch.testing.assert_close(it["seed"][c][v], rgb[c % 3][v], atol=1e-5, rtol=0)
            assert it["seed"][:, ~v].abs().sum() == 0 and (it["mask"][~v] == 255).all()
            assert set(it["mask"][v].unique().tolist()) <= set(range(C + 1)) | {255}


def test_seed_cams_wrong_shape(toy):
    ds = load_dataset("toyvoc", toy, "train")
    with pytest.raises(BadInputError, match="seed_cams"):
        TrainDataset(ds, crop=64, seed_cams=lambda name, hw: np.zeros((2, *hw), np.float32))[0]


def test_infer_dataset(toy):
    ds = load_dataset("toyvoc", toy, "val")
    it = InferDataset(ds, scales=(1.0, 0.5, 2.0))[1]
    H, W = ds.image(1).shape[:2]
    assert it["size"] == (H, W)
    assert [tuple(t.shape) for t in it["imgs"]] == [(2, 3, H, W), (2, 3, round(H / 2), round(W / 2)), (2, 3, 2 * H, 2 * W)]
    assert torch.equal(it["imgs"][0][1], it["imgs"][0][0].flip(-1))


# --- a user's folder is never replaced (regressions: ensure_toyvoc, pot-toyvoc and training used to regenerate it) ----

def _users_folder(root: Path) -> Path:
    "A VOC-layout folder a user made by hand: images and masks, no classes.txt, no ToyVOC manifest."
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"): (root / d).mkdir(parents=True)
    (root / "JPEGImages" / "mine.jpg").write_bytes(b"my photo")
    (root / "ImageSets/Segmentation/train.txt").write_text("mine\n")
    return root


def test_users_folder_is_never_replaced(tmp_path, capsys):
    user = _users_folder(tmp_path / "mine")
    with pytest.raises(BadInputError, match="no toyvoc.json manifest"): ensure_toyvoc(user, n_train=2, n_val=0, progress=False)
    assert "no toyvoc.json manifest" in cli_error(toyvoc_cli, ["--out", str(user), "--n_train", "2", "--n_val", "0", "--quiet", "--force"], capsys)
    from pot.train import train
    from pot.core import POTConfig
    with pytest.raises(BadInputError, match="classes.txt"):
        train(POTConfig(dataset="toyvoc", data_root=str(user), out_dir=str(tmp_path / "run"), pretrained=None, device="cpu"))
    assert (user / "JPEGImages" / "mine.jpg").read_bytes() == b"my photo"
    assert sorted(p.name for p in user.iterdir()) == ["ImageSets", "JPEGImages", "SegmentationClass"]


def test_toyvoc_with_other_parameters_is_kept(tmp_path, capsys):
    out = tmp_path / "t"
    toyvoc_cli(["--out", str(out), "--n_train", "4", "--n_val", "1", "--size", "64", "--quiet"])
    before = _digest(out)
    assert "n_train: 4 there, 600 asked" in cli_error(toyvoc_cli, ["--out", str(out), "--quiet"], capsys)
    with pytest.raises(BadInputError, match="size: 64 there, 160 asked"): ensure_toyvoc(out, n_train=4, n_val=1, progress=False)
    assert _digest(out) == before
    toyvoc_cli(["--out", str(out), "--n_train", "3", "--n_val", "1", "--size", "64", "--quiet", "--force"])   # ours: replaced on request
    assert load_json(out / "toyvoc.json")["params"]["n_train"] == 3


def test_missing_data_root_is_not_generated(tmp_path):
    from pot.train import train
    from pot.core import POTConfig
    typo = tmp_path / "toyvco"
    with pytest.raises(BadInputError, match="no such folder; generate ToyVOC there first"):
        train(POTConfig(data_root=str(typo), out_dir=str(tmp_path / "run"), pretrained=None, device="cpu"))
    assert not typo.exists()


def test_bad_images_and_foreign_classes_fail_before_training(toy, tmp_path):
    "A truncated JPEG used to surface mid-epoch (after a checkpoint); a VOC folder without classes.txt failed at step 0 on a foreign name."
    from pot.train import train
    from pot.core import POTConfig
    bad = tmp_path / "bad"
    shutil.copytree(toy, bad)
    ds = load_dataset("toyvoc", bad, "train")
    ds.check_images()
    assert (bad / "ImageSets/Segmentation/train.images_ok").is_file()
    jpg = ds.image_path(len(ds) - 1)
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])          # truncated: same header, half the data
    with pytest.raises(BadInputError, match=f"{jpg.name}: not a readable image"): load_dataset("toyvoc", bad, "train").check_images()
    cfg = dict(data_root=str(bad), out_dir=str(tmp_path / "run"), pretrained=None, device="cpu", batch_size=2, epochs=1)
    with pytest.raises(BadInputError, match=jpg.name): train(POTConfig(**cfg))
    assert not (tmp_path / "run" / "ckpt").exists()
    foreign = tmp_path / "foreign"
    shutil.copytree(toy, foreign)
    (foreign / "classes.txt").unlink()
    with pytest.raises(BadInputError, match="has no classes.txt, so dataset='voc' assumed its standard classes"):
        train(POTConfig(**dict(cfg, data_root=str(foreign), dataset="voc")))
