"""Sketch data: formats, the .npz reader/writer, malformed files, augmentation against the official
loop, preprocessing counts and the built-in Hershey and synthetic sketches."""
import logging

import numpy as np
import pytest
import torch

from zoo.data.sketches import (
    SketchDataModule,
    augment_strokes,
    hershey_sketches,
    polylines_to_stroke3,
    read_npz,
    render_sketches,
    scale_factor,
    sketches_to_svg,
    stroke3_to_polylines,
    stroke3_to_stroke5,
    stroke5_to_stroke3,
    synthetic_sketches,
    write_npz,
)


def sketches(n=5, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(1, 12))
        s = np.zeros((L, 3), dtype=np.int16)
        s[:, :2] = rng.integers(-40, 40, (L, 2))
        s[:, 2] = rng.random(L) < 0.3
        s[-1, 2] = 1
        out.append(s)
    return out


def test_stroke3_stroke5_round_trip_and_layout():
    seqs = sketches()
    steps = max(len(s) for s in seqs) + 1
    batch, lengths = stroke3_to_stroke5(seqs, steps)
    assert batch.shape == (5, steps + 1, 5)
    assert torch.all(batch[:, 0] == torch.tensor([0, 0, 1, 0, 0.0]))
    for b, s in enumerate(seqs):
        n = len(s)
        assert torch.all(batch[b, n + 1:, 4] == 1) and torch.all(batch[b, n + 1:, :4] == 0)
        assert torch.all(batch[b, 1:n + 1, 2] + batch[b, 1:n + 1, 3] == 1)
    back = stroke5_to_stroke3(batch[:, 1:], lengths)
    for a, b in zip(seqs, back):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="end token"):
        stroke3_to_stroke5(seqs, steps - 1)


def test_npz_write_read_identical_and_is_the_published_format(tmp_path):
    data = {"train": sketches(6, 1), "valid": sketches(3, 2), "test": sketches(3, 3)}
    data["train"][1] = data["train"][0].copy()  # equal-length records must stay an object array
    path = write_npz(tmp_path / "cls.npz", data)
    raw = np.load(path, encoding="latin1", allow_pickle=True)
    assert raw["train"].dtype == object and raw["train"].ndim == 1 and raw["train"][0].dtype == np.int16
    back = read_npz(path)
    for split in data:
        assert len(back[split]) == len(data[split])
        for a, b in zip(data[split], back[split]):
            np.testing.assert_array_equal(a, b)


def write_raw(path, **arrays):
    np.savez(path, **arrays)
    return path


def obj(*records):
    a = np.empty(len(records), dtype=object)
    for i, r in enumerate(records):
        a[i] = r
    return a


def test_malformed_files_name_file_split_and_record(tmp_path):
    good = np.array([[1, 2, 0], [3, 4, 1]], dtype=np.int16)
    f = write_raw(tmp_path / "nokey.npz", train=obj(good), test=obj(good))
    with pytest.raises(ValueError, match=r"nokey\.npz.*lacks the split\(s\) \['valid'\]"):
        read_npz(f)
    cases = {
        "shape": (np.array([1, 2, 0], dtype=np.int16), "record 1: expected an \\(L, 3\\)"),
        "nan": (np.array([[1.0, np.nan, 0]]), "record 1: row 0 holds NaN"),
        "pen": (np.array([[1, 2, 2]], dtype=np.int16), "record 1: row 0 has pen_lifted = 2"),
        "empty": (np.zeros((0, 3), dtype=np.int16), "record 1: the sketch has no points"),
    }
    for name, (bad, msg) in cases.items():
        f = write_raw(tmp_path / f"{name}.npz", train=obj(good, bad), valid=obj(good), test=obj(good))
        with pytest.raises(ValueError, match=f"{name}\\.npz, split 'train', {msg}"):
            read_npz(f)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        read_npz(tmp_path / "junk.npz")


def official_augment_strokes(strokes, prob, u):
    """magenta's augment_strokes loop (utils.py), with its np.random.rand() draws replaced by u."""
    result = []
    prev_stroke = [0, 0, 1]
    count = 0
    stroke = [0, 0, 1]
    for i in range(len(strokes)):
        candidate = [strokes[i][0], strokes[i][1], strokes[i][2]]
        if candidate[2] == 1 or prev_stroke[2] == 1:
            count = 0
        else:
            count += 1
        if candidate[2] == 0 and prev_stroke[2] == 0 and count > 2 and u[i] < prob:
            stroke[0] += candidate[0]
            stroke[1] += candidate[1]
        else:
            stroke = candidate
            prev_stroke = stroke
            result.append(stroke)
    return np.array(result)


def test_augment_strokes_equals_official_loop():
    rng = np.random.default_rng(0)
    for k in range(50):
        seq = sketches(1, k)[0].astype(np.float64)
        seq = np.concatenate([seq, sketches(1, 100 + k)[0]]).astype(np.float64)
        u = rng.random(len(seq))
        ours = augment_strokes(seq, 0.5, u=u)
        np.testing.assert_allclose(ours, official_augment_strokes(seq, 0.5, u))
        np.testing.assert_allclose(ours[:, :2].sum(0), seq[:, :2].sum(0))  # end point kept


def test_datamodule_drops_long_sketches_with_count_and_scale_factor(tmp_path, caplog):
    a = {"train": sketches(8, 1) + [np.tile([[1, 1, 0]], (30, 1)).astype(np.int16)],
         "valid": sketches(3, 2), "test": sketches(2, 3)}
    b = {"train": sketches(6, 4), "valid": sketches(2, 5), "test": sketches(2, 6)}
    paths = [str(write_npz(tmp_path / "a.npz", a)), str(write_npz(tmp_path / "b.npz", b))]
    dm = SketchDataModule(path=paths, max_seq_len=20, batch_size=4)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert "dropped 1 of 15" in caplog.text
    assert dm.report["train"]["dropped"] == 1 and dm.class_names == ["a", "b"]
    train = a["train"][:8] + b["train"]
    assert dm.scale_factor == pytest.approx(float(np.concatenate([s[:, :2].ravel() for s in train]).std()))
    assert dm.steps == max(len(s) for split in (a, b) for s in split["train"][:8] + split["valid"] + split["test"]) + 1
    batch = next(iter(dm.val_dataloader()))  # raw, unaugmented offsets
    assert batch["strokes"].shape[1:] == (dm.steps + 1, 5)
    np.testing.assert_array_equal(stroke5_to_stroke3(batch["strokes"][:1, 1:], batch["lengths"][:1])[0], a["valid"][0])
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch["strokes"].shape == (4, dm.steps + 1, 5)


def test_hershey_glyphs_are_real_strokes():
    glyphs = hershey_sketches(["futural"], unit=1)["futural"]
    assert len(glyphs) == 95  # the printable ASCII glyphs but the space
    a = stroke3_to_polylines(glyphs[ord("A") - ord("!")])
    # Hershey's simplex 'A': two strokes down from a common apex and a horizontal crossbar
    assert [len(line) for line in a] == [2, 2, 2]
    np.testing.assert_array_equal(a[0][0], a[1][0])
    assert a[0][1][1] > a[0][0][1] and a[0][1][0] < a[0][0][0] < a[1][1][0]
    assert a[2][0][1] == a[2][1][1]
    o = stroke3_to_polylines(glyphs[ord("O") - ord("!")])
    assert len(o) == 1 and np.array_equal(o[0][0], o[0][-1]) and len(o[0]) > 10  # a closed curve
    with pytest.raises(ValueError, match="unknown Hershey font"):
        hershey_sketches(["nope"])


def test_synthetic_sketches_are_deterministic_and_varied():
    a = synthetic_sketches(4, seed=1)
    b = synthetic_sketches(4, seed=1)
    assert list(a) == list(b) and len(a) == 8
    for k in a:
        for x, y in zip(a[k], b[k]):
            np.testing.assert_array_equal(x, y)
    assert len({len(s) for s in a["circle"]}) > 1
    assert all(int(s[:, 2].sum()) == 2 for s in a["house"] + a["cross"])  # two strokes each
    assert synthetic_sketches(2, seed=2)["circle"][0].tolist() != a["circle"][0].tolist()


def test_render_and_svg_draw_every_sketch():
    seqs = [polylines_to_stroke3([np.array([[0, 0], [10, 0], [10, 10]])]),
            np.array([[0, 0, 1]], dtype=np.int16)]  # a single point
    img = render_sketches(seqs, columns=2, cell=32)
    assert img.shape == (32, 64, 3) and img.dtype == np.uint8
    assert (img[:, :32] < 128).any() and (img[:, 32:] < 128).any()
    svg = sketches_to_svg(seqs, columns=2, cell=32)
    assert svg.count("<path") == 2 and svg.startswith("<svg")


def test_scale_factor_and_degenerate():
    assert scale_factor([np.array([[1.0, -1.0, 0], [1.0, -1.0, 1]])]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="std 0"):
        scale_factor([np.zeros((3, 3))])


def test_training_batches_are_a_function_of_seed_epoch_and_index():
    # What a resumed run relies on: epoch e's batches do not depend on the epochs drawn before it.
    def batches(dm, epoch, skip_first):
        loader = dm.train_dataloader()
        if skip_first:
            list(loader)  # iterate epoch 0 first, consuming whatever RNG it uses
        loader.sampler.set_epoch(epoch)
        return list(loader)

    def dm(seed=0):
        d = SketchDataModule(builtin="synthetic", classes=["circle", "house"], num_per_class=10, batch_size=4,
                             max_seq_len=60, seed=seed)
        d.setup("fit")
        return d

    a, b = batches(dm(), 1, True), batches(dm(), 1, False)
    torch.manual_seed(123)  # the global RNG plays no part
    c = batches(dm(), 1, False)
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x["strokes"], y["strokes"], rtol=0, atol=0)
        torch.testing.assert_close(x["strokes"], z["strokes"], rtol=0, atol=0)
    e0 = batches(dm(), 0, False)
    assert not all(torch.equal(x["label"], y["label"]) for x, y in zip(e0, a))  # a new order each epoch
    ds = dm().train_dataloader().dataset
    np.testing.assert_array_equal(ds[(1, 3)][0], ds[(1, 3)][0])
    assert not np.array_equal(ds[(0, 3)][0], ds[(1, 3)][0])  # augmented differently each epoch
    d = dm()
    assert sorted(i for _, i in d.train_dataloader().sampler) == list(range(len(d.sets["train"])))
