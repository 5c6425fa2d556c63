"""Published weights, offline: `timm.create_model("mambavision_*", pretrained=True)` against a local HTTP
server standing in for huggingface.co, serving files in NVIDIA's layout that the tests write (a tiny
network's random weights): the pretrained cfgs, download into timm's cache (TORCH_HOME, a temporary
folder), strict load, new heads, one-line errors, and ImageClassification(pretrained=True), which
fetches in `setup("fit")` only: building it, and `zoo.load` of its checkpoints, make no request."""
import argparse
import http.server
import io
import socket
import threading
import warnings
from pathlib import Path

import pytest
import timm
import torch

import zoo
from tests.conftest import cli_args
from zoo.cli import ZooCLI, error_line
from zoo.models.mambavision import VARIANTS, load_official_checkpoint
from zoo.tasks.classification import ImageClassification

NET = dict(dim=8, in_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 2, 2), window_size=(8, 8, 2, 1))
FILE = "mambavision_tiny_1k.pth.tar"

# NVIDIA's files as the official code's default_cfgs (NVlabs/MambaVision mambavision/models/mamba_vision.py)
# lists them: tag -> (repo under huggingface.co/nvidia, file, input size, crop_pct, crop_mode)
PUBLISHED = {
    "mambavision_t.nvlabs_in1k": ("MambaVision-T-1K", FILE, 224, 1.0, "center"),
    "mambavision_t2.nvlabs_in1k": ("MambaVision-T2-1K", "mambavision_tiny2_1k.pth.tar", 224, 0.98, "center"),
    "mambavision_s.nvlabs_in1k": ("MambaVision-S-1K", "mambavision_small_1k.pth.tar", 224, 0.93, "center"),
    "mambavision_b.nvlabs_in1k": ("MambaVision-B-1K", "mambavision_base_1k.pth.tar", 224, 1.0, "center"),
    "mambavision_b.nvlabs_in21k_ft_in1k": ("MambaVision-B-21K", "mambavision_base_21k.pth.tar", 224, 1.0, "center"),
    "mambavision_l.nvlabs_in1k": ("MambaVision-L-1K", "mambavision_large_1k.pth.tar", 224, 1.0, "center"),
    "mambavision_l.nvlabs_in21k_ft_in1k": ("MambaVision-L-21K", "mambavision_large_21k.pth.tar", 224, 1.0, "center"),
    "mambavision_l2.nvlabs_in1k": ("MambaVision-L2-1K", "mambavision_large2_1k.pth.tar", 224, 1.0, "center"),
    "mambavision_l2_512.nvlabs_in21k_ft_in1k": ("MambaVision-L2-512-21K", "mambavision_L2_21k_240m_512.pth.tar",
                                                512, 0.93, "squash"),
    "mambavision_l3.nvlabs_in21k_ft_in1k": ("MambaVision-L3-256-21K", "mambavision_L3_21k_740m_256.pth.tar",
                                            256, 1.0, "center"),
    "mambavision_l3_512.nvlabs_in21k_ft_in1k": ("MambaVision-L3-512-21K", "mambavision_L3_21k_740m_512.pth.tar",
                                                512, 0.93, "squash"),
}


class Server:
    """http://127.0.0.1:<port>/<name> serves `files[name]` (bytes), else 404; `requests` lists the paths
    asked for."""

    def __init__(self):
        self.files, self.requests = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path.lstrip("/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str = FILE) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}/{name}"


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """timm's download cache in a temporary TORCH_HOME (and HF_HOME); returns its checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def official_file(model: torch.nn.Module) -> bytes:
    """`model`'s weights as NVIDIA publishes them: the checkpoint of timm's training script, which
    also holds the optimizer state and the run's argparse Namespace."""
    buf = io.BytesIO()
    torch.save({"epoch": 309, "arch": "mamba_vision_T", "state_dict": model.state_dict(),
                "optimizer": torch.optim.AdamW(model.parameters()).state_dict(), "version": 2,
                "args": argparse.Namespace(model="mamba_vision_T", lr=5e-3), "metric": 82.3}, buf)
    return buf.getvalue()


def random_net(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("mambavision_t", **NET, **kw)
    with torch.no_grad():  # batch-norm statistics too, so that a load that missed them would show
        for k, t in model.state_dict().items():
            if t.is_floating_point():
                t.uniform_(0.5, 1.5) if k.endswith("running_var") else t.uniform_(-0.5, 0.5)
    return model.eval()


def published(server: Server, **kw) -> torch.nn.Module:
    """timm.create_model("mambavision_t", pretrained=True) with the cfg's url on `server`."""
    return timm.create_model("mambavision_t", pretrained=True, pretrained_cfg_overlay=dict(url=server.url()),
                             **NET, **kw).eval()


def test_pretrained_cfgs_name_nvidias_files():
    assert set(timm.list_pretrained("mambavision*")) == set(PUBLISHED)
    for tag, (repo, file, size, crop_pct, crop_mode) in PUBLISHED.items():
        cfg = timm.models.get_pretrained_cfg(tag)
        assert cfg.url == f"https://huggingface.co/nvidia/{repo}/resolve/main/{file}", tag
        assert (cfg.input_size, cfg.crop_pct, cfg.crop_mode) == ((3, size, size), crop_pct, crop_mode), tag
        assert (cfg.num_classes, cfg.classifier, cfg.interpolation) == (1000, "head", "bicubic")
        assert (cfg.mean, cfg.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        assert cfg.custom_load and not cfg.hf_hub_id  # a url, read by MambaVision.load_pretrained
    # pretrained=True without a tag loads the official default (ImageNet-1K) weights
    assert timm.models.get_pretrained_cfg("mambavision_b").tag == "nvlabs_in1k"
    for name in ("mambavision_l2", "mambavision_l3"):  # the 512 px weights' windows cover the stage maps
        assert VARIANTS[f"{name}_512"] == {**VARIANTS[name], "window_size": (8, 8, 32, 16)}


def test_download_once_into_the_cache_then_strict_load(server, cache):
    src = random_net()
    server.files[FILE] = official_file(src)
    model = published(server)
    assert server.requests == [f"/{FILE}"] and (cache / FILE).is_file()
    ref = timm.create_model("mambavision_t", **NET).eval()  # the same file, loaded directly
    load_official_checkpoint(ref, cache / FILE, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
    # the second time, and on a machine that cannot reach the server, the cache answers
    server.files.clear()
    with torch.no_grad():
        torch.testing.assert_close(published(server)(x), ref(x), rtol=0, atol=0)
    assert server.requests == [f"/{FILE}"]


def test_other_num_classes_and_in_chans_get_a_new_head_and_an_adapted_stem(server, cache):
    src = random_net()
    server.files[FILE] = official_file(src)
    model = published(server, num_classes=8, in_chans=1)
    assert model.head.weight.shape == (8, 64) and (model.head.bias == 0).all()  # the model's own head init
    body = {k: v for k, v in src.state_dict().items() if not k.startswith(("head.", "patch_embed.conv_down.0."))}
    for k, v in body.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    stem = src.patch_embed.conv_down[0].weight  # timm's adapt_input_conv: RGB summed for one channel
    torch.testing.assert_close(model.patch_embed.conv_down[0].weight, stem.sum(1, keepdim=True))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 8)


def closed_port() -> int:
    with socket.socket() as s:  # a port nothing listens on: connection refused, as on a machine offline
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["404", "offline", "truncated", "wrong layout"])
def test_download_and_file_errors_are_one_clear_line(server, cache, case):
    good = official_file(random_net())
    url = server.url()
    if case == "404":
        url = server.url("nope.pth.tar")
    elif case == "offline":
        url = f"http://127.0.0.1:{closed_port()}/{FILE}"
    elif case == "truncated":
        server.files[FILE] = good[:len(good) // 2]
    else:  # the Hugging Face transformers wrapper's names (model.*), not the official ones
        buf = io.BytesIO()
        torch.save({"state_dict": {f"model.{k}": v for k, v in random_net().state_dict().items()}}, buf)
        server.files[FILE] = buf.getvalue()
    with pytest.raises((ValueError, RuntimeError)) as info:
        timm.create_model("mambavision_t", pretrained=True, pretrained_cfg_overlay=dict(url=url), **NET)
    message, name = str(info.value), url.rsplit("/", 1)[1]
    assert "\n" not in message and message.startswith("pretrained weights of mambavision_t: ")
    assert url in message and str(cache / name) in message, message
    expect = {"404": "HTTP 404", "offline": "load_official_checkpoint(model, file)",
              "truncated": "cannot be read as a PyTorch checkpoint", "wrong layout": "missing keys"}[case]
    assert expect in message, message
    if case in ("404", "offline"):  # where the cache looked, and how to supply the file
        assert "the cache has no" in message and "put it there" in message and not (cache / name).exists()
    else:  # the file came from the server and stays in the cache: say how to fetch it afresh
        assert "delete it to download it again" in message
    line = error_line(info.value)
    assert line.startswith("error: ") and "\n" not in line and url in line


# ----------------------------------------------------------------------------------------------------
# ImageClassification(pretrained=True)

def task(server: Server, **kw) -> ImageClassification:
    overlay = {"pretrained_cfg_overlay": {"url": server.url()}}
    return ImageClassification("mambavision_t", num_classes=8, model_kwargs={**NET, **overlay}, pretrained=True,
                               **kw)


def test_weights_that_cannot_be_loaded_are_one_line_naming_the_model(server, cache):
    server.files[FILE] = official_file(random_net())
    model = ImageClassification("mambavision_t", num_classes=8, pretrained=True, model_kwargs={
        **NET, "dim": 16, "pretrained_cfg_overlay": {"url": server.url()}})  # not the published width
    with pytest.raises(ValueError, match=r"^pretrained=True: the published weights of 'mambavision_t' could not be "
                                         r"loaded \(their shapes differ from this network's: model_kwargs .*'dim': 16.* "
                                         r"change its architecture\); pretrained=false trains from scratch$"):
        model.setup("fit")
    with pytest.raises(ValueError, match=r"^model_name 'mambavision_t.no_such_tag': mambavision_t has no published "
                                         r"weights tagged 'no_such_tag'; its tags: nvlabs_in1k$"):
        ImageClassification("mambavision_t.no_such_tag", num_classes=8, pretrained=True, model_kwargs=NET)


def test_the_task_without_internet_says_whole_how_to_supply_the_file(cache):
    url = f"http://127.0.0.1:{closed_port()}/{FILE}"
    model = ImageClassification("mambavision_t", num_classes=8, pretrained=True,
                                model_kwargs={**NET, "pretrained_cfg_overlay": {"url": url}})
    with pytest.raises(ValueError) as info:
        model.setup("fit")
    assert str(info.value).endswith("put it there (the cache follows TORCH_HOME), or build the model without pretrained "
                                    "and call zoo.models.mambavision.load_official_checkpoint(model, file)); "
                                    "pretrained=false trains from scratch")


def test_task_fetches_in_fit_setup_only_and_gets_a_new_head(server, cache):
    src = random_net()
    server.files[FILE] = official_file(src)
    model = task(server)
    model.setup("validate")
    assert server.requests == []  # building the task, or evaluating, fetches nothing
    model.setup("fit")
    assert server.requests == [f"/{FILE}"]
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            torch.testing.assert_close(model.net.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert model.net.head.weight.shape == (8, 64) and model.hparams.pretrained is True
    with pytest.raises(ValueError, match=r"model_kwargs \['pretrained'\] are the task's own arguments"):
        ImageClassification("mambavision_t", model_kwargs={**NET, "pretrained": True})
    with pytest.raises(ValueError, match=r"\['in_chans', 'num_classes'\] are the task's own arguments; set them as "
                                         r"model.in_chans, data.num_classes$"):  # the model's follows the data's
        ImageClassification("mambavision_t", model_kwargs={**NET, "num_classes": 3, "in_chans": 1})


def test_task_other_norms_start_from_the_pretrained_affine_parameters(server, cache):
    src = random_net()
    server.files[FILE] = official_file(src)
    model = task(server, conv_norm="group", token_norm="rms")
    with pytest.warns(UserWarning, match="conv_norm='group', token_norm='rms': the replaced norm layers start "
                                         "from the pretrained affine parameters only"):
        model.setup("fit")
    net = model.net
    for new, old in ((net.patch_embed.conv_down[1], src.patch_embed.conv_down[1]), (net.norm, src.norm),
                     (net.levels[0].blocks[0].norm2, src.levels[0].blocks[0].norm2)):
        assert type(new).__name__ == "GroupNorm"
        torch.testing.assert_close(new.weight, old.weight, rtol=0, atol=0)
        torch.testing.assert_close(new.bias, old.bias, rtol=0, atol=0)
    assert type(net.levels[2].blocks[0].norm1).__name__ == "RmsNorm"  # keeps the weight; has no bias
    torch.testing.assert_close(net.levels[2].blocks[0].norm1.weight, src.levels[2].blocks[0].norm1.weight)
    torch.testing.assert_close(net.levels[2].blocks[0].mixer.A_log, src.levels[2].blocks[0].mixer.A_log)


def test_any_timm_model_pretrained_with_norm_surgery(tmp_path, cache):
    """A timm model's own (native) weight file, here given as the pretrained_cfg's `file`, through the
    same surgery as the task's network: ResNet's batch norms become group norms with their affine
    weights."""
    narrow = dict(stem_width=8, channels=[8, 16, 16, 16])
    torch.manual_seed(0)
    src = timm.create_model("resnet10t", **narrow)
    torch.save(src.state_dict(), tmp_path / "resnet.pth")
    model = ImageClassification("resnet10t", num_classes=4, norm="group", pretrained=True,
                                model_kwargs={**narrow, "pretrained_cfg_overlay": {"file": str(tmp_path / "resnet.pth")}})
    with pytest.warns(UserWarning, match="norm='group': the replaced norm layers start"):
        model.setup("fit")
    assert type(model.net.bn1).__name__ == "GroupNorm" and model.net.fc.weight.shape == (4, 16)
    torch.testing.assert_close(model.net.bn1.weight, src.bn1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.net.conv1[0].weight, src.conv1[0].weight, rtol=0, atol=0)


def test_cli_fit_from_published_weights_then_zoo_load_makes_no_request(server, cache, tmp_path, monkeypatch):
    src = random_net()
    server.files[FILE] = official_file(src)
    run = tmp_path / "run"
    overlay = '{"url": "%s"}' % server.url()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's small-data warnings
        cli = ZooCLI(args=["fit", *cli_args(
            "mambavision", run, "--model.pretrained=true", f"--model.model_kwargs.pretrained_cfg_overlay={overlay}",
            *(f"--model.model_kwargs.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in NET.items()),
            "--model.sample_images=0", "--data.image_size=32", "--data.num_train=16", "--data.num_val=8",
            "--data.batch_size=4")])
    assert server.requests == [f"/{FILE}"]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["pretrained"] is True
    # another machine: an empty cache and no server; the weights come from the checkpoint
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
    server.files.clear()
    loaded = zoo.load(ckpt)
    assert server.requests == [f"/{FILE}"] and not (tmp_path / "elsewhere").exists()
    x = torch.rand(2, 3, 32, 32) * 255
    cli.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cli.model(x), rtol=0, atol=0)
