"""U-Net speed against MONAI: a training step, and whole-image inference on a large image.

    python benchmarks/bench_unet.py              # CPU-sized: base 16 channels, 256 px crops, a 1024 px image
    python benchmarks/bench_unet.py --full       # paper width (64), 576 px crops, a 2048 px image (a GPU)
    python benchmarks/bench_unet.py --device cuda --image 2048

MONAI is not a zoo dependency (`pip install monai`); without it the MONAI rows are skipped and only
the reference that needs nothing else is printed: tiled_predict vs one whole-image pass of the same net.

1. Training step (forward, cross-entropy, backward, SGD step) of zoo's UNet vs MONAI's BasicUNet of
   matched size: same widths (b, 2b, 4b, 8b, 16b), ReLU, the same norm, same-padded 3x3 convs (the
   only padding BasicUNet has, so ours runs with padding="same" too), 2x2 max-pool, 2x2 transposed
   convs. BasicUNet's last up-conv keeps 2b channels where the paper's halves them (+0.2% params at
   b = 64: 31,100,354 vs 31,030,658 without norm).
2. Segmenting one (1, 1, I, I) image into class probabilities, each in its own way:
   - ours: tiled_predict with the paper's valid-conv net (388 px output tiles, exact mirror context),
   - MONAI: sliding_window_inference with BasicUNet (576 px windows, overlap 0.25, blended), softmax,
   - the same two tilers on the same network (our same-padded UNet), which isolates the tiling code,
   - the reference: whole_image_predict, one pass of the valid net over the mirror-padded image.
   All use the same batch of tiles per forward (--tile-batch).
3. The synthetic data's cost per image (the datamodule makes each image and its weight map once, in
   setup): `make_cell` and `weight_map` on a --data-size px image, in ms and in training steps (section 1).
   (These timings were once asserted in tests/test_cells.py; tests check behaviour, this prints speed.)

Modules are timed in alternating blocks; the ratio is the median over repeats of ours / theirs in
adjacent blocks (ratio < 1: ours is faster), which cancels most load from other processes.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.data.cells import make_cell, weight_map  # noqa: E402
from zoo.models.unet import UNet, tiled_predict, whole_image_predict  # noqa: E402
from zoo.norm import default_num_groups  # noqa: E402

INSTALL_HINT = "MONAI is not installed: `pip install monai` (or `.venv/bin/pip install monai`) for the MONAI rows"


def load_monai():
    try:
        from monai.inferers import sliding_window_inference
        from monai.networks.nets import BasicUNet
    except ImportError:
        return None
    return BasicUNet, sliding_window_inference


def monai_norm(norm: str, base: int):
    """MONAI's spec for a zoo norm name. Group norm: MONAI takes one group count for every layer, so
    it gets zoo's count for the first level's width (zoo picks per layer, up to 32 groups)."""
    return {"none": None, "batch": "batch", "instance": ("instance", {"affine": True}),
            "group": ("group", {"num_groups": default_num_groups(base)})}[norm]


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns, repeats, device, warmup=1):
    """Seconds of each call of each fn, `repeats` calls each, in alternating order (reversed every
    repeat) so that adjacent calls see the same machine load."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(timed(fns[i], device))
    return times


def ratio(a, b) -> float:
    """Median over repeats of a / b (times of adjacent calls)."""
    return statistics.median(x / y for x, y in zip(a, b))


def train_step_fn(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        opt.step()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="paper width 64, 576 px crops, 2048 px image")
    p.add_argument("--base", type=int, default=None, help="base channels (default 16, --full 64)")
    p.add_argument("--crop", type=int, default=None,
                   help="training crop side, a multiple of 16 (default 256, --full 576)")
    p.add_argument("--batch", type=int, default=2, help="training batch size")
    p.add_argument("--image", type=int, default=None, help="inference image side (default 1024, --full 2048)")
    p.add_argument("--tile-batch", type=int, default=4, help="tiles per forward in inference")
    p.add_argument("--norm", default="batch", choices=["none", "batch", "instance", "group"],
                   help="norm of both nets in the training step")
    p.add_argument("--data-size", type=int, default=256, help="synthetic image side for the data timings")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5 training, 3 inference)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    args = p.parse_args()
    base = args.base or (64 if args.full else 16)
    crop = args.crop or (576 if args.full else 256)
    image = args.image or (2048 if args.full else 1024)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    monai = load_monai()
    torch.manual_seed(0)
    threads = f" (threads={torch.get_num_threads()})" if device.type == "cpu" else ""
    print(f"torch {torch.__version__}, monai {monai and __import__('monai').__version__}, device {device}{threads}, "
          f"float32, base channels {base}")
    if monai is None:
        print(INSTALL_HINT)
    widths = (base, 2 * base, 4 * base, 8 * base, 16 * base, base)

    # 1. training step ------------------------------------------------------------------------------
    print(f"\n## training step: batch {args.batch} x 1 x {crop} x {crop}, norm {args.norm}, SGD, "
          "forward + cross-entropy + backward + step")
    ours = UNet(base_channels=base, padding="same", norm=args.norm).to(device).train()
    x = torch.randn(args.batch, 1, crop, crop, device=device)
    target = torch.randint(0, 2, (args.batch, crop, crop), device=device)
    fns, rows = [train_step_fn(ours, x, target)], [("zoo UNet (same padding)", params(ours))]
    if monai is not None:
        BasicUNet, _ = monai
        theirs = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=widths, act="relu",
                           norm=monai_norm(args.norm, base)).to(device).train()
        fns.append(train_step_fn(theirs, x, target))
        rows.append(("MONAI BasicUNet", params(theirs)))
    times = interleaved(fns, args.repeats or 5, device)
    print("| model | params | ms / step | zoo / this |\n|---|---:|---:|---:|")
    for (name, n), t in zip(rows, times):
        print(f"| {name} | {n:,} | {1e3 * statistics.median(t):.1f} | {ratio(times[0], t):.3f} |")
    step_s = statistics.median(times[0])
    del ours, fns

    # 2. whole-image inference ----------------------------------------------------------------------
    print(f"\n## segmenting a 1 x 1 x {image} x {image} image into probabilities, norm none, eval, "
          f"{args.tile_batch} tiles per forward")
    img = torch.randn(1, 1, image, image, device=device)
    valid = UNet(base_channels=base).to(device).eval()
    same = UNet(base_channels=base, padding="same").to(device).eval()
    bs = args.tile_batch
    fns = [lambda: tiled_predict(valid, img, batch_size=bs)]
    rows = ["zoo tiled_predict, valid (paper) net, 388 px tiles (572 px inputs)"]
    if monai is not None:
        BasicUNet, swi = monai
        basic = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=widths, act="relu",
                          norm=None).to(device).eval()

        def monai_predict(net):
            with torch.no_grad():
                return swi(img, (576, 576), bs, net, overlap=0.25).softmax(1)
        fns += [lambda: monai_predict(basic), lambda: tiled_predict(same, img, tile=576, batch_size=bs),
                lambda: monai_predict(same)]
        rows += ["MONAI sliding_window_inference, BasicUNet, 576 px windows, overlap 0.25",
                 "zoo tiled_predict, zoo same-padded UNet, 576 px tiles (halo 112 -> 800 px inputs)",
                 "MONAI sliding_window_inference, zoo same-padded UNet, 576 px windows, overlap 0.25"]
    fns.append(lambda: whole_image_predict(valid, img))
    rows.append(f"reference: whole_image_predict, valid net, one {valid.input_size_for_output(image)} px pass")
    times = interleaved(fns, args.repeats or 3, device)
    print("| method | s / image | Mpx / s | time: zoo tiled (valid) / this |\n|---|---:|---:|---:|")
    for name, t in zip(rows, times):
        m = statistics.median(t)
        print(f"| {name} | {m:.2f} | {image * image / m / 1e6:.2f} | {ratio(times[0], t):.3f} |")
    if monai is not None:
        print(f"\nsame network (zoo same-padded UNet), time of tiled_predict / sliding_window_inference: "
              f"{ratio(times[2], times[3]):.3f}")

    # 3. synthetic data, once per image in the datamodule's setup (CPU) ------------------------------
    size = args.data_size
    print(f"\n## synthetic data per {size} px image (CPU, threads={torch.get_num_threads()})")
    repeats = args.repeats or 5
    images = [make_cell(i, size, 0) for i in range(repeats + 1)]  # one per call, warm-up included
    new_image, next_masks = iter(range(len(images))), iter(images)
    cases = [("make_cell", lambda: make_cell(next(new_image), size, 0)),
             ("weight_map (w0 10, sigma 5)", lambda: weight_map(*next(next_masks)[1:]))]
    times = interleaved([fn for _, fn in cases], repeats, torch.device("cpu"))
    print(f"| step | cells | ms / image | per training step ({1e3 * step_s:.1f} ms) |\n|---|---:|---:|---:|")
    cells = statistics.median(int(inst.max()) for _, _, inst in images)
    for (name, _), t in zip(cases, times):
        print(f"| {name} | {cells:.0f} | {1e3 * statistics.median(t):.1f} | {statistics.median(t) / step_s:.3f} |")


if __name__ == "__main__":
    main()
