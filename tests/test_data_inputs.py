"""Bad or unusual inputs to the datamodules: images of more than 8 bits, empty splits, skipped files,
paths of the wrong kind, text encodings, class counts and duplicate sketch files."""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import ColorJitter

from zoo.data import CellsDataModule
from zoo.data.images import ImagesDataModule, _JitterInRange
from zoo.data.segmentation import list_images, read_rgb
from zoo.data.seq2seq import Seq2SeqDataModule
from zoo.data.sketches import SketchDataModule, load_sketch_files, write_npz
from zoo.data.text import LMDataModule, read_lines
from zoo.tasks.segmentation import UNetSegmentation


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------------------------------
# images of more than 8 bits (classifier)

def test_read_rgb_keeps_the_values_of_16_bit_and_float_images(tmp_path):
    u16 = np.array([[1000, 30000], [65535, 0]], np.uint16)
    f32 = np.array([[-2.5, 0.25], [1e5, 3.0]], np.float32)
    save(tmp_path / "u16.png", u16)
    save(tmp_path / "f32.tif", f32)
    save(tmp_path / "u8.png", np.full((2, 2), 200, np.uint8))
    for name, want in (("u16.png", u16), ("f32.tif", f32)):
        got = read_rgb(tmp_path / name)
        assert got.dtype == torch.float32 and got.shape == (3, 2, 2), name
        for c in range(3):
            np.testing.assert_array_equal(got[c].numpy(), want.astype(np.float32))
    u8 = read_rgb(tmp_path / "u8.png")  # 8-bit: the PIL image timm's transforms take, as before
    assert isinstance(u8, Image.Image) and u8.mode == "RGB" and u8.getpixel((0, 0)) == (200, 200, 200)


def test_classifier_folder_of_16_bit_images_keeps_their_values(tmp_path):
    for split in ("train", "val"):
        for cls, value in (("dark", 1000), ("light", 30000)):
            for i in range(2):
                save(tmp_path / split / cls / f"{cls}{i}.png", np.full((12, 14), value, np.uint16))
    save(tmp_path / "pred" / "p.png", np.full((12, 14), 30000, np.uint16))
    dm = ImagesDataModule(root=str(tmp_path), num_classes=2, image_size=8, batch_size=4,
                          predict_dir=str(tmp_path / "pred"))
    dm.setup("fit")
    val = next(iter(dm.val_dataloader()))
    want = torch.tensor([1000.0, 1000.0, 30000.0, 30000.0])[:, None, None, None].expand(4, 3, 8, 8)
    torch.testing.assert_close(val["image"], want)  # not clipped to 255
    train = next(iter(dm.train_dataloader()))  # crop, flip, jitter of a constant image: the same constant
    torch.testing.assert_close(train["image"].sort(0).values, want)
    dm.setup("predict")
    torch.testing.assert_close(next(iter(dm.predict_dataloader()))["image"], torch.full((1, 3, 8, 8), 30000.0))


def test_color_jitter_of_float_images_works_in_their_own_range():
    x = torch.tensor([1000.0, 2000.0, 3000.0]).expand(3, 1, 3)
    # brightness x2 on (x - 1000) / 2000 = [0, 0.5, 1] -> [0, 1, 1] (clipped), mapped back
    out = _JitterInRange(ColorJitter(brightness=(2, 2)))(x)
    torch.testing.assert_close(out, torch.tensor([1000.0, 3000.0, 3000.0]).expand(3, 1, 3))
    pil = Image.fromarray(np.full((2, 2, 3), 100, np.uint8))
    assert np.asarray(_JitterInRange(ColorJitter(brightness=(2, 2)))(pil)).max() == 200  # PIL as before


# ----------------------------------------------------------------------------------------------------
# empty validation (and test) splits

def test_seq2seq_empty_validation_split_is_refused():
    dm = Seq2SeqDataModule(task="reverse", num_train=20, num_val=0, num_test=2, max_length=4)
    with pytest.raises(ValueError, match=r"^the validation split of reverse is empty \(num_val=0\); give "
                                         r"--data.num_val 1 or more$"):
        dm.setup("fit")
    dm = Seq2SeqDataModule(task="reverse", num_train=20, num_val=2, num_test=0, max_length=4)
    dm.setup("fit")  # fit needs no test split
    with pytest.raises(ValueError, match=r"^the test split of reverse is empty \(num_test=0\); give "
                                         r"--data.num_test 1 or more$"):
        Seq2SeqDataModule(task="reverse", num_train=20, num_val=2, num_test=0, max_length=4).setup("test")


def sketch(n, length=3):
    return [np.tile(np.array([[1, 2, 0]], np.int16), (length, 1)) + np.array([[i, 0, 0]], np.int16)
            for i in range(n)]


def test_sketch_file_with_an_empty_validation_split_is_refused(tmp_path):
    path = write_npz(tmp_path / "a.npz", {"train": sketch(4), "valid": [], "test": sketch(2)})
    with pytest.raises(ValueError, match=r"^the validation \('valid'\) split of .*a.npz is empty; it needs sketches"):
        SketchDataModule(path=str(path), batch_size=2).setup("fit")
    SketchDataModule(path=str(path), batch_size=2).setup("predict")  # predicting needs the test split only


def test_other_datamodules_refuse_an_empty_validation_split(tmp_path):
    save(tmp_path / "seg" / "train" / "images" / "a.png", np.zeros((8, 8), np.uint8))
    save(tmp_path / "seg" / "train" / "masks" / "a.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "seg" / "val" / "images").mkdir(parents=True)
    (tmp_path / "seg" / "val" / "masks").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        CellsDataModule(root=str(tmp_path / "seg"), crop_size=4).setup("fit")
    save(tmp_path / "img" / "train" / "a" / "a.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "img" / "train" / "b" / "b.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "img" / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        ImagesDataModule(root=str(tmp_path / "img"), num_classes=2, image_size=8).setup("fit")
    (tmp_path / "t.txt").write_text("abcdefghij" * 10)
    with pytest.raises(ValueError, match="validation split"):
        LMDataModule(path=str(tmp_path / "t.txt"), block_size=8, val_fraction=0.05).setup("fit")
    with pytest.raises(ValueError, match="num_val=0"):
        CellsDataModule(num_val=0)
    with pytest.raises(ValueError, match="num_val=0"):
        ImagesDataModule(num_val=0)


# ----------------------------------------------------------------------------------------------------
# sketches dropped by max_seq_len, duplicate files

def test_sketch_splits_emptied_by_max_seq_len_are_refused_naming_it(tmp_path):
    path = write_npz(tmp_path / "a.npz", {"train": sketch(4), "valid": sketch(2), "test": sketch(2, length=9)})
    with pytest.raises(ValueError, match=r"^the test split of .*a.npz is empty: max_seq_len=5 dropped all 2 of its "
                                         r"sketches as longer; raise --data.max_seq_len$"):
        SketchDataModule(path=str(path), batch_size=2, max_seq_len=5).setup("predict")
    SketchDataModule(path=str(path), batch_size=2, max_seq_len=5).setup("fit")  # fit does not need the test split
    path = write_npz(tmp_path / "b.npz", {"train": sketch(4, length=9), "valid": sketch(2), "test": sketch(2)})
    with pytest.raises(ValueError, match=r"^the training split of .*b.npz is empty: max_seq_len=5 dropped all 4 "):
        SketchDataModule(path=str(path), batch_size=2, max_seq_len=5).setup("fit")
    path = write_npz(tmp_path / "c.npz", {"train": sketch(2) + sketch(3, length=9), "valid": sketch(2),
                                          "test": sketch(2)})
    with pytest.raises(ValueError, match=r"has 2 sketches \(max_seq_len=5 dropped 3\), fewer than batch_size=4; "
                                         r"lower --data.batch_size or raise --data.max_seq_len$"):
        SketchDataModule(path=str(path), batch_size=4, max_seq_len=5).setup("fit")


def test_the_same_sketch_class_twice_is_refused(tmp_path):
    splits = {"train": sketch(2), "valid": sketch(1), "test": sketch(1)}
    a = write_npz(tmp_path / "circ.npz", splits)
    b = write_npz(tmp_path / "d2" / "circ.npz", splits)
    with pytest.raises(ValueError, match=r"circ.npz' is listed twice$"):
        load_sketch_files([a, tmp_path / "d2" / ".." / "circ.npz"])
    with pytest.raises(ValueError, match=r"sketch files '.*/circ.npz' and '.*/d2/circ.npz' would both be class 'circ'"):
        load_sketch_files([a, b])


# ----------------------------------------------------------------------------------------------------
# U-Net predict without training data

def test_unet_predict_without_root_takes_rgb_images_and_the_model_checks_channels(tmp_path):
    save(tmp_path / "p" / "a.png", np.zeros((20, 24, 3), np.uint8))
    save(tmp_path / "p" / "b.png", np.full((22, 20, 3), 9, np.uint8))
    dm = CellsDataModule(predict_dir=str(tmp_path / "p"))
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [tuple(b["image"].shape) for b in batches] == [(1, 3, 20, 24), (1, 3, 22, 20)]
    model = UNetSegmentation(in_channels=1, net={"base_channels": 2, "depth": 2})
    with pytest.raises(ValueError, match=r"^the input has 3 channel\(s\) \(shape \(1, 3, 20, 24\), channel_dim=1\), the model takes 1: "
                                         r"its input scaler holds statistics of 1 channel\(s\); give 1-channel inputs$"):
        model.predict_step(batches[0], 0)
    save(tmp_path / "p" / "c.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(ValueError, match=r"c.png has 1 channel\(s\), expected 3"):  # the images must agree
        CellsDataModule(predict_dir=str(tmp_path / "p")).setup("predict")


# ----------------------------------------------------------------------------------------------------
# skipped files, paths of the wrong kind

def test_predict_folders_take_imagefolders_suffixes_and_name_skipped_files(tmp_path):
    d = tmp_path / "p"
    for name in ("a.webp", "b.ppm", "c.PGM", "d.png"):
        save(d / name, np.zeros((6, 6, 3) if name[0] != "c" else (6, 6), np.uint8))
    (d / "notes.txt").write_text("x")
    (d / "e.gif").write_bytes(b"GIF89a")
    (d / ".hidden").write_text("x")
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) that are not images .*: e.gif, notes.txt$"):
        files = list_images(d)
    assert sorted(files) == ["a", "b", "c", "d"]
    dm = ImagesDataModule(image_size=8, predict_dir=str(d))
    with pytest.warns(UserWarning, match="notes.txt"):
        dm.setup("predict")
    assert len(dm.predict_set) == 4


def test_synthetic_images_as_files_are_predicted_as_validation_sees_them(tmp_path):
    """A model trained on the built-in shapes saw them whole at image_size: its validation images saved
    as PNG files and given as predict_dir reach it unchanged (no evaluation crop, which would zoom)."""
    dm = ImagesDataModule(image_size=16, num_val=4)
    dm.setup("validate")
    for i in range(4):
        save(tmp_path / f"{i}.png", dm.val_set.images[i].permute(1, 2, 0).numpy())
    files = ImagesDataModule(image_size=16, num_val=4, predict_dir=str(tmp_path))
    files.setup("predict")
    for i in range(4):
        assert torch.equal(files.predict_set[i]["image"], dm.val_set[i]["image"].float())
    with pytest.raises(ValueError, match=r"^crop_pct=0.9 is for folder data \(root\)"):
        ImagesDataModule(crop_pct=0.9)
    with pytest.raises(ValueError, match=r"^crop_pct=0.875 is for folder data \(root\)"):  # timm's default too
        ImagesDataModule(crop_pct=0.875)
    # folder data: timm's evaluation resize to S / crop_pct (0.875 unless given), then the center crop
    for crop_pct, side in ((None, math.floor(64 / 0.875)), (1.0, 64), (0.5, 128)):
        resize = ImagesDataModule(root=str(tmp_path), image_size=64, crop_pct=crop_pct)._transform(False).transforms[0]
        assert resize.size == side, crop_pct


def test_classifier_warns_about_files_outside_class_folders(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            save(tmp_path / split / cls / f"{cls}.png", np.zeros((8, 8, 3), np.uint8))
    save(tmp_path / "train" / "loose.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    dm = ImagesDataModule(root=str(tmp_path), num_classes=2, image_size=8)
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    messages = {str(w.message) for w in record}
    assert f"{tmp_path / 'train'}: skipped 1 file(s) that are not in a class folder: loose.png" in messages
    assert any(m.endswith("that are not images (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp): "
                          "a/notes.txt") for m in messages)


def test_paths_of_the_wrong_kind_say_what_they_are(tmp_path):
    save(tmp_path / "a.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(NotADirectoryError, match=r"^predict_dir .*a.png is a file; expected a folder of images"):
        CellsDataModule(predict_dir=str(tmp_path / "a.png")).setup("predict")
    with pytest.raises(NotADirectoryError, match=r"^predict_dir .*a.png is a file"):
        ImagesDataModule(predict_dir=str(tmp_path / "a.png")).setup("predict")
    with pytest.raises(ValueError, match=r"^predict_dir .*nothere does not exist"):
        CellsDataModule(predict_dir=str(tmp_path / "nothere")).setup("predict")
    with pytest.raises(IsADirectoryError, match=r"^text file '.*' is a folder; expected a UTF-8 text file$"):
        LMDataModule(path=str(tmp_path)).setup("fit")
    with pytest.raises(IsADirectoryError, match=r"^--data.predict_path '.*' is a folder; expected a UTF-8 text file$"):
        read_lines(str(tmp_path))
    with pytest.raises(IsADirectoryError, match=r"^sketch file '.*' is a folder; expected a sketch-rnn .npz file$"):
        SketchDataModule(path=str(tmp_path)).setup("fit")


# ----------------------------------------------------------------------------------------------------
# text encodings

def test_prompt_file_that_is_not_utf8_names_the_file(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"^--data.predict_path '.*p.txt' is not UTF-8 text"):
        read_lines(str(tmp_path / "p.txt"))


def test_a_utf8_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "t.txt").write_bytes("\ufeffab".encode() + b"ba" * 40)
    dm = LMDataModule(path=str(tmp_path / "t.txt"), block_size=4, val_fraction=0.25)
    dm.setup("fit")
    assert sorted(dm.tokenizer.itos[4:]) == ["a", "b"]  # no "\ufeff" token
    (tmp_path / "p.txt").write_bytes("\ufeffhello\nworld\n".encode())
    assert read_lines(str(tmp_path / "p.txt")) == ["hello", "world"]


# ----------------------------------------------------------------------------------------------------
# class count of a folder

def test_folder_class_count_must_match_num_classes(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog", "eel"):
            save(tmp_path / split / cls / f"{cls}.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"train has 3 class folders \(cat, dog, eel\) but num_classes=8; pass "
                                         r"--data.num_classes 3$"):
        ImagesDataModule(root=str(tmp_path), image_size=8).setup("fit")
    dm = ImagesDataModule(root=str(tmp_path), image_size=8, num_classes=3)
    dm.setup("fit")
    assert dm.classes == ["cat", "dog", "eel"]
