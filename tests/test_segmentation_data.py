"""The paper's augmentation, the segmentation folder loader and CellsDataModule."""
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from zoo.data import CellsDataModule
from zoo.data.augment import (
    ElasticGrid, GrayValue, GridWarp, RandomRigid, RandomWarp, WeightMap, elastic_displacement, paper_augmentation,
    rigid_displacement, set_generator, warp,
)
from zoo.data.cells import connected_components, make_cell, weight_map
from zoo.data.segmentation import read_image, read_mask, read_split, reflect_index
from zoo.scaling import InputScaler


def sample(size=48, seed=0):
    img, sem, inst = make_cell(0, size, seed, cell_size=12.0)
    return {"image": tv_tensors.Image(img), "mask": tv_tensors.Mask(sem), "instances": tv_tensors.Mask(inst),
            "weight": WeightMap(weight_map(sem, inst))}


# ----------------------------------------------------------------------------- augmentation

def test_zero_strength_is_exact_identity():
    s = sample()
    for t in (ElasticGrid(std=0.0), RandomRigid(0, 0), RandomWarp(0.0, degrees=0, max_shift=0)):
        out = t(s)
        for k in s:
            assert torch.equal(out[k], s[k]) and type(out[k]) is type(s[k]), (t, k)


def test_warp_keeps_labels_types_shapes_and_dtypes():
    s = sample()
    out = paper_augmentation(generator=torch.Generator().manual_seed(1))(s)
    for k in s:
        assert type(out[k]) is type(s[k]) and out[k].shape == s[k].shape and out[k].dtype == s[k].dtype, k
    assert not torch.equal(out["image"], s["image"])
    # Nearest neighbour for masks: only existing label values come out.
    assert set(out["mask"].unique().tolist()) <= set(s["mask"].unique().tolist())
    assert set(out["instances"].unique().tolist()) <= set(s["instances"].unique().tolist())
    # Bilinear for the weight map: stays within its range, and gray values leave it alone.
    assert s["weight"].min() - 1e-5 <= out["weight"].min() and out["weight"].max() <= s["weight"].max() + 1e-5
    # The image is resampled bilinearly (non-integer values appear) and its range stays raw 0-255-like.
    assert out["image"].max() > 50


def test_same_generator_same_output():
    s = sample()
    a = paper_augmentation(generator=torch.Generator().manual_seed(3))(s)
    t = paper_augmentation()
    set_generator(t, torch.Generator().manual_seed(3))
    b = t(s)
    set_generator(t, torch.Generator().manual_seed(4))
    c = t(s)
    assert all(torch.equal(a[k], b[k]) for k in s)
    assert not torch.equal(a["image"], c["image"])


def test_constant_displacement_shifts_by_known_amount():
    x = torch.arange(20 * 30, dtype=torch.float32).view(1, 20, 30)
    d = torch.zeros(2, 20, 30)
    d[0], d[1] = 2.0, -3.0  # output(y, x) = input(y + 2, x - 3)
    out = warp(x, d)
    torch.testing.assert_close(out[:, :18, 3:], x[:, 2:, :27])
    m = torch.randint(0, 5, (20, 30))
    assert torch.equal(warp(m, d, mode="nearest")[:18, 3:], m[2:, :27])
    # Beyond the border: mirror reflection (edge not repeated).
    torch.testing.assert_close(out[:, 18, 3:], x[:, 18, :27])  # row 20 -> row 18

    class Shift(GridWarp):
        def displacement(self, size, generator):
            return d

    out = Shift()({"image": tv_tensors.Image(x), "mask": tv_tensors.Mask(m)})
    torch.testing.assert_close(out["image"][:, :18, 3:], x[:, 2:, :27])
    # A pure shift by RandomRigid's convention moves content by +shift.
    r = warp(x, rigid_displacement((20, 30), 0.0, (2.0, -3.0)))
    torch.testing.assert_close(r[:, 2:, :27], x[:, :18, 3:])


def test_rotation_by_90_degrees_is_rot90():
    x = torch.rand(2, 9, 9)
    out = warp(x, rigid_displacement((9, 9), 90.0, (0.0, 0.0)))
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(1, 2)), atol=1e-4, rtol=0)


def test_elastic_field_statistics_on_the_3x3_grid():
    g = torch.Generator().manual_seed(0)
    fields = torch.stack([elastic_displacement((33, 33), std=10.0, grid=3, generator=g) for _ in range(1500)])
    nodes = fields[:, :, ::16, ::16]  # the 3x3 grid nodes (corners, edge midpoints, centre)
    assert nodes.shape[-2:] == (3, 3)
    assert nodes.std().item() == pytest.approx(10.0, rel=0.03)
    assert abs(nodes.mean().item()) < 0.3
    # Bicubic interpolation between nodes: smooth, and not more spread out than the nodes.
    assert fields.std().item() < nodes.std().item()
    assert (fields[:, :, 1:] - fields[:, :, :-1]).abs().max() < 5
    # ElasticGrid draws its field from its generator.
    t = ElasticGrid(10.0, generator=torch.Generator().manual_seed(0))
    d = t.make_params([torch.zeros(1, 33, 33)])["displacement"]
    torch.testing.assert_close(d, elastic_displacement((33, 33), 10.0, 3, torch.Generator().manual_seed(0)))


def test_gray_value_changes_raw_images_only():
    s = sample()
    out = GrayValue(brightness=0.2, contrast=0.3, gamma=0.5, generator=torch.Generator().manual_seed(0))(s)
    assert not torch.equal(out["image"], s["image"])
    for k in ("mask", "instances", "weight"):
        assert torch.equal(out[k], s[k])
    # Works on the image's own range (raw, not [0, 1]): zero strengths are the identity.
    same = GrayValue(0, 0, 0)(s)["image"]
    torch.testing.assert_close(same, s["image"], atol=1e-3, rtol=1e-5)
    bright = GrayValue(0, 0, 0)(tv_tensors.Image(s["image"] * 10 + 1000))
    torch.testing.assert_close(bright, s["image"] * 10 + 1000, atol=1e-2, rtol=1e-5)


# ----------------------------------------------------------------------------- folders

def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_root(root, rgb=False, sizes=((40, 44), (36, 50)), val_sizes=((32, 32),), tiff=True):
    """A folder dataset from synthetic cells: train/ with PNGs (and one TIFF), val/ with PNGs."""
    rng = np.random.default_rng(0)
    for split, shapes in (("train", sizes), ("val", val_sizes)):
        for i, (h, w) in enumerate(shapes):
            img, sem, _ = make_cell(i, (h, w), [9, len(split)], cell_size=12.0)
            a = img[0].numpy().astype(np.uint8)
            if rgb:
                a = np.stack([a, 255 - a, rng.integers(0, 255, a.shape, dtype=np.uint8)], -1)
            ext = ".tif" if (tiff and split == "train" and i == len(shapes) - 1) else ".png"
            write(root / split / "images" / f"img{i}{ext}", a)
            write(root / split / "masks" / f"img{i}.png", sem.numpy().astype(np.uint8))
    return root


@pytest.mark.parametrize("rgb", [False, True])
def test_folder_datamodule_grayscale_and_rgb(tmp_path, rgb):
    root = make_root(tmp_path / "data", rgb=rgb)
    split = read_split(root / "train", num_classes=2)
    assert split["names"] == ["img0.png", "img1.tif"]
    assert [tuple(i.shape) for i in split["images"]] == [(3 if rgb else 1, 40, 44), (3 if rgb else 1, 36, 50)]
    assert split["instances"] is None
    dm = CellsDataModule(root=str(root), crop_size=24, context=6, batch_size=2, input_norm="minmax")
    dm.setup("fit")
    c = 3 if rgb else 1
    assert dm.in_channels == c and dm.scaler.shift.shape == (c,)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, c, 36, 36) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == batch["weight"].shape == (2, 24, 24) and batch["mask"].dtype == torch.int64
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, c, 32, 32) and val["mask"].shape == val["weight"].shape == (1, 32, 32)
    assert val["name"] == ["img0.png"]
    # Without instances/: the border term uses the connected components of the cell class.
    m = split["masks"][0]
    torch.testing.assert_close(dm.splits["train"].weights[0], weight_map(m, connected_components(m), 10.0, 5.0,
                                                                         dm.class_weights))


def test_read_image_and_mask_modes(tmp_path):
    u16 = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500)
    f32 = np.linspace(-3.5, 7.25, 120, dtype=np.float32).reshape(12, 10)
    write(tmp_path / "u16.tif", u16)
    write(tmp_path / "u16.png", u16)
    write(tmp_path / "f32.tif", f32)
    write(tmp_path / "rgba.png", np.full((12, 10, 4), 7, np.uint8))
    for name, want in (("u16.tif", u16), ("u16.png", u16), ("f32.tif", f32)):
        got = read_image(tmp_path / name)
        assert got.shape == (1, 12, 10) and got.dtype == torch.float32
        np.testing.assert_array_equal(got[0].numpy(), want.astype(np.float32))  # raw values, not rescaled
    assert read_image(tmp_path / "rgba.png").shape == (3, 12, 10)  # alpha dropped
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "pal.png")
    assert read_mask(tmp_path / "pal.png").tolist() == [[0, 1], [2, 1]]  # palette indices are the ids
    with pytest.raises(ValueError, match="rgba.png.*single-channel"):
        read_mask(tmp_path / "rgba.png")


def test_folder_instances_are_used(tmp_path):
    root = make_root(tmp_path / "data", tiff=False)
    # One instance file for everything: the whole cell class is a single instance -> no border term.
    for split in ("train", "val"):
        for p in (root / split / "masks").iterdir():
            write(root / split / "instances" / p.name, np.asarray(Image.open(p)))
    dm = CellsDataModule(root=str(root), crop_size=16)
    dm.setup("fit")
    w, m = dm.splits["train"].weights[0], dm.splits["train"].mask(0)
    torch.testing.assert_close(w, dm.class_weights[m])
    (root / "val" / "instances" / "img0.png").unlink()
    with pytest.raises(ValueError, match="img0"):
        read_split(root / "val", 2)


def test_folder_errors_name_the_file(tmp_path):
    def fresh(name):
        return make_root(tmp_path / name, tiff=False)

    root = fresh("nomask")
    (root / "train" / "masks" / "img1.png").unlink()
    with pytest.raises(ValueError, match="img1.png"):
        read_split(root / "train", 2)

    root = fresh("noimage")
    write(root / "train" / "masks" / "extra.png", np.zeros((40, 44), np.uint8))
    with pytest.raises(ValueError, match="extra.png"):
        read_split(root / "train", 2)

    root = fresh("size")
    write(root / "train" / "masks" / "img0.png", np.zeros((41, 44), np.uint8))
    with pytest.raises(ValueError, match="size mismatch.*img0.png"):
        read_split(root / "train", 2)

    root = fresh("unreadable")
    (root / "train" / "images" / "img0.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="cannot read image file .*img0.png"):
        read_split(root / "train", 2)

    root = fresh("stack")  # a 3-page TIFF: its first page alone would pass for the image
    pages = [Image.fromarray(np.full((40, 44), v, np.uint8)) for v in (10, 20, 30)]
    (root / "train" / "images" / "img0.png").unlink()
    pages[0].save(root / "train" / "images" / "img0.tif", save_all=True, append_images=pages[1:])
    with pytest.raises(ValueError, match=r"image file .*img0.tif holds 3 pages \(a stack\); save one file per page"):
        read_split(root / "train", 2)

    root = fresh("value")
    write(root / "train" / "masks" / "img1.png", np.full((36, 50), 5, np.uint8))
    with pytest.raises(ValueError, match="img1.png.* 5"):
        CellsDataModule(root=str(root)).setup("fit")

    root = fresh("mixed")
    write(root / "train" / "images" / "img1.png", np.zeros((36, 50, 3), np.uint8))
    with pytest.raises(ValueError, match="img1.png.*channel"):
        read_split(root / "train", 2)

    root = fresh("crop")
    with pytest.raises(ValueError, match="crop_size 40 .*img1.png.*36x50"):
        CellsDataModule(root=str(root), crop_size=40).train_dataloader()

    root = fresh("notest")
    with pytest.raises(ValueError, match="test"):
        CellsDataModule(root=str(root), crop_size=16).setup("test")

    empty = tmp_path / "empty"
    empty.mkdir()
    dm = CellsDataModule(image_size=32, num_train=1, num_val=1, crop_size=16, predict_dir=str(empty))
    with pytest.raises(ValueError, match="empty"):
        dm.setup("predict")
    dm = CellsDataModule(image_size=32, num_train=1, num_val=1, crop_size=16, predict_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="missing"):
        dm.setup("predict")


# ----------------------------------------------------------------------------- datamodule

def small_dm(**kw):
    args = dict(image_size=48, num_train=4, num_val=2, crop_size=20, batch_size=2)
    args.update(kw)
    return CellsDataModule(**args)


@pytest.mark.parametrize("context", [0, 92])
def test_training_crops_shapes_and_mirror_context(context):
    dm = small_dm(context=context, augment=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    side = 20 + 2 * context
    assert batch["image"].shape == (2, 1, side, side) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 20, 20) and batch["mask"].dtype == torch.int64
    assert batch["weight"].shape == (2, 20, 20) and batch["weight"].dtype == torch.float32
    # Without augmentation a crop is a window of the image mirror-padded by c (numpy's "reflect",
    # repeated when c exceeds the image), and the mask/weight are its centre.
    data = dm.train_dataloader().dataset
    item = data[(0, 1)]
    split = dm.splits["train"]
    image = split.images[1][0].numpy()
    padded = np.pad(image, context, mode="reflect")
    hits = [(y, x) for y in range(48 - 20 + 1) for x in range(48 - 20 + 1)
            if np.array_equal(padded[y:y + side, x:x + side], item["image"][0].numpy())]
    assert len(hits) == 1
    y, x = hits[0]
    assert torch.equal(item["mask"], split.mask(1)[y:y + 20, x:x + 20])
    assert torch.equal(item["weight"], split.weights[1][y:y + 20, x:x + 20])


def test_reflect_index_matches_numpy():
    for n in (1, 2, 5):
        idx = torch.arange(-13, n + 13)
        want = np.pad(np.arange(n), 13, mode="reflect") if n > 1 else np.zeros(n + 26, int)
        np.testing.assert_array_equal(reflect_index(idx, n).numpy(), want)


def test_context_from_attached_model():
    dm = small_dm()
    dm.setup("fit")
    assert dm.training_context() == 0  # no trainer
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(input_context=12), training=False)
    assert dm.training_context() == 12
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, 44, 44)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace())  # a module without input_context
    assert dm.training_context() == 0
    dm = small_dm(context=3)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(input_context=12))
    assert dm.training_context() == 3  # explicit context wins


def test_datamodule_determinism_and_epochs():
    def first_batch(dm, epoch=0):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))

    a, b = small_dm(), small_dm()
    a.setup("fit")
    b.setup("fit")
    ba, bb = first_batch(a), first_batch(b)
    assert all(torch.equal(ba[k], bb[k]) for k in ba)
    assert set(ba["mask"].unique().tolist()) <= {0, 1} and (ba["weight"] > 0).all()
    assert not torch.equal(first_batch(a, 1)["image"], ba["image"])
    c = small_dm(seed=1)
    c.setup("fit")
    assert not torch.equal(first_batch(c)["image"], ba["image"])
    # Synthetic splits are distinct streams.
    assert not torch.equal(a.splits["train"].images[0], a.splits["val"].images[0])


def test_scaler_is_fitted_on_the_training_split_only():
    a = small_dm(input_norm="robust", num_val=1)
    b = small_dm(input_norm="robust", num_val=3)
    a.setup("fit")
    b.setup("fit")
    ref = InputScaler(1, kind="robust").fit(a.train_images())
    torch.testing.assert_close(a.scaler.shift, ref.shift)
    torch.testing.assert_close(a.scaler.scale, ref.scale)
    assert len(a.splits["val"]) != len(b.splits["val"])
    torch.testing.assert_close(a.scaler.shift, b.scaler.shift)  # val differs, scaler does not
    torch.testing.assert_close(a.scaler.scale, b.scaler.scale)
    both = InputScaler(1, kind="robust").fit(a.train_images() + [i[None] for i in a.splits["val"].images])
    assert not torch.equal(both.shift, a.scaler.shift)
    c = small_dm(input_norm="robust", num_train=5)
    c.setup("fit")
    assert not torch.equal(c.scaler.shift, a.scaler.shift)  # train differs, scaler differs


def test_eval_and_predict_loaders(tmp_path):
    dm = small_dm()
    dm.setup("test")
    t = next(iter(dm.test_dataloader()))
    assert t["image"].shape == (1, 1, 48, 48) and t["mask"].shape == t["weight"].shape == (1, 48, 48)
    assert t["name"] == ["cells_test_0000"]
    dm.setup("predict")
    p = list(dm.predict_dataloader())
    assert len(p) == 2 and set(p[0]) == {"image", "name"} and p[0]["name"] == ["cells_val_0000"]
    d = tmp_path / "pred"
    write(d / "a.png", np.zeros((37, 53), np.uint8))
    write(d / "b.tif", np.ones((64, 40), np.uint8))
    (d / "notes.txt").write_text("ignored")
    dm = small_dm(predict_dir=str(d))
    dm.setup("predict")
    p = list(dm.predict_dataloader())
    assert [x["name"] for x in p] == [["a.png"], ["b.tif"]]
    assert dm.splits == {} and dm.class_weights is None  # predicting a folder needs no labelled data
    assert p[0]["image"].shape == (1, 1, 37, 53) and p[1]["image"].shape == (1, 1, 64, 40)
    write(d / "c.png", np.zeros((8, 8, 3), np.uint8))
    dm = small_dm(predict_dir=str(d))
    with pytest.raises(ValueError, match="c.png"):
        dm.setup("predict")


def test_hparams_are_plain_and_arguments_checked():
    dm = small_dm()
    assert all(isinstance(v, (str, int, float, bool, type(None))) for v in dm.hparams.values())
    with pytest.raises(ValueError, match="bogus"):
        CellsDataModule(input_norm="bogus")
    with pytest.raises(ValueError, match="crop_size"):
        CellsDataModule(crop_size=0)
    with pytest.raises(ValueError, match="crop_size 60.*48x48"):
        small_dm(crop_size=60).train_dataloader()


class TinyValidNet(L.LightningModule):
    """A 5x5 valid convolution: 2 px of context per side, like a (very) small U-Net."""

    input_context = 2

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 5)
        self.seen = []

    def training_step(self, batch, batch_idx):
        logits = self.conv(batch["image"] / 255)
        assert logits.shape[-2:] == batch["mask"].shape[-2:]
        self.seen.append((self.current_epoch, batch["image"].sum().item()))
        return (torch.nn.functional.cross_entropy(logits, batch["mask"], reduction="none") * batch["weight"]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`", "ignore:.*LeafSpec")
def test_lightning_fit_reads_context_and_reseeds_each_epoch(tmp_path):
    def run():
        model, dm = TinyValidNet(), small_dm(num_train=4, batch_size=2)
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path)
        trainer.fit(model, datamodule=dm)
        assert dm.training_context() == 2
        return model.seen

    seen = run()
    assert [e for e, _ in seen] == [0, 0, 1, 1]
    assert seen[0][1] != seen[2][1]  # epoch 1 draws new crops
    assert run() == seen  # and the same ones every run
