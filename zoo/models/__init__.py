"""Networks of the zoo, one module per family. Importing this package registers them with timm
(`timm.create_model("unet")`); `create_model` builds any timm-registered network by name."""
import difflib
import inspect
import re
import warnings

import timm
import torch
from timm.models import get_arch_name, split_model_name_tag
from torch import nn

from zoo.norm import NORM_KINDS, replace_norms

from zoo.models import mambavision, sketch_rnn, transformer  # noqa: F401  (one module per model family)
from zoo.models.unet import (
    DoubleConv,
    Down,
    InputSizes,
    UNet,
    Up,
    check_input_size,
    input_size_for_output,
    output_size,
    seam_error,
    tiled_predict,
    valid_input_sizes,
    whole_image_predict,
)

__all__ = ["create_model", "norm_arguments", "UNet", "DoubleConv", "Down", "Up", "InputSizes", "valid_input_sizes",
           "check_input_size", "output_size", "input_size_for_output", "tiled_predict", "whole_image_predict", "seam_error"]


def norm_arguments(model_name: str, norm: str | None = None, conv_norm: str | None = None,
                   token_norm: str | None = None) -> dict[str, str]:
    """The norm arguments `timm.create_model(model_name)` itself takes for these norms: MambaVision's
    conv_norm and token_norm (`norm` sets both; None: the official batch / layer), {} for every other
    model (its norms are replaced after construction). Unknown kinds and contradictions are refused."""
    for name, kind in (("norm", norm), ("conv_norm", conv_norm), ("token_norm", token_norm)):
        if kind is not None and kind not in NORM_KINDS:
            raise ValueError(f"{name}={kind!r} is not a norm kind; valid kinds: {', '.join(NORM_KINDS)} (or null: the "
                             "network's own norms)")
    # norm sets both; one of them given away from the official norms too would be silently overridden
    clash = [f"{k}={v!r}" for k, v, official in (("conv_norm", conv_norm, "batch"), ("token_norm", token_norm, "layer"))
             if norm is not None and v not in (None, official)]
    if clash:
        raise ValueError(f"norm={norm!r} sets both conv_norm and token_norm, and {', '.join(clash)} is given too; "
                         "give norm alone, or conv_norm and token_norm")
    if get_arch_name(model_name) in mambavision.VARIANTS:
        return {"conv_norm": norm or conv_norm or "batch", "token_norm": norm or token_norm or "layer"}
    if conv_norm is not None or token_norm is not None:
        raise ValueError(f"conv_norm and token_norm are MambaVision's arguments, not {model_name}'s; "
                         f"use norm (one of {', '.join(NORM_KINDS)}, or null to keep its own norms)")
    return {}


def create_model(model_name: str, *, norm: str | None = None, norm_skip=(), conv_norm: str | None = None,
                 token_norm: str | None = None, pretrained: bool = False, **kwargs) -> nn.Module:
    """`timm.create_model(model_name, pretrained=pretrained, **kwargs)` with any `zoo.norm` kind for its norms.

    norm: every norm of the network becomes this kind: through MambaVision's own arguments, for every other
    model by `zoo.norm.replace_norms` once timm has built it (None keeps the network's own norms), which
    leaves the classes `norm_skip` names as they are.
    conv_norm, token_norm: MambaVision's (`norm_arguments`). With `pretrained`, the network is built as
    published and its norms are then converted: the replaced ones keep only the affine parameters (warned).

    Bad input is a one-line ValueError: a name timm does not know (naming the closest registered names),
    a weights tag it does not have (naming its tags), keyword arguments the model does not take (naming
    them and the ones it takes), a norm kind the network cannot take, weights that do not load."""
    check_model_name(model_name)
    own = norm_arguments(model_name, norm, conv_norm, token_norm)
    if norm_skip and (norm is None or own):
        raise ValueError(f"norm_skip={norm_skip!r} is read only when norm converts the network's norms (replace_norms)"
                         + ("; MambaVision builds its norms from its arguments" if own else ", and norm is None"))
    try:  # MambaVision is published with its official norms
        net = timm.create_model(model_name, pretrained=pretrained, **kwargs, **({} if pretrained else own))
    except Exception as e:  # noqa: BLE001  (timm and huggingface_hub raise many kinds: no such weights or tag,
        # no network, weights of another shape)
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if isinstance(e, TypeError) and unexpected:
            raise ValueError(rejected_kwargs(model_name, kwargs, unexpected[1])) from e
        if not pretrained:  # a value of the wrong type or shape, which timm does not check
            if isinstance(e, ValueError):  # (timm's and zoo's own ValueErrors say what is wrong)
                raise
            call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            raise ValueError(f"timm could not build {model_name}({call}): {type(e).__name__}: "
                             f"{' '.join(str(e).split())}") from e
        text = " ".join(str(e).split())  # long for torch's size mismatches: cut, but not a download's advice
        reason = (f"their shapes differ from this network's: model_kwargs {kwargs} change its architecture"
                  if "size mismatch" in text or "of other shapes" in text
                  else (text if len(text) <= 800 else text[:800] + " ...") or type(e).__name__)
        raise ValueError(f"pretrained=True: the published weights of {model_name!r} could not be loaded "
                         f"({reason}); pretrained=false trains from scratch") from e
    replaced = norm is not None if not own else pretrained and (own["conv_norm"], own["token_norm"]) != ("batch", "layer")
    if replaced and own:
        mambavision.convert_norms(net, own["conv_norm"], own["token_norm"])
    elif replaced:
        try:
            replace_norms(net, norm, skip=norm_skip)
        except (ValueError, TypeError) as e:
            skip = "; norm_skip (class names) leaves such modules as they are" if "cannot convert" in str(e) else ""
            text = "norm_" + str(e) if str(e).startswith("skip:") else str(e)  # (replace_norms' skip is norm_skip)
            raise ValueError(f"norm={norm!r} for {model_name}: {text}{skip}; norm=null keeps its own norms") from e
    if replaced and pretrained:
        given = f"norm={norm!r}" if norm is not None else f"conv_norm={own['conv_norm']!r}, token_norm={own['token_norm']!r}"
        warnings.warn(f"pretrained=True with {given}: the replaced norm layers start from the pretrained affine "
                      "parameters only (the weight, and the bias where the new kind has one)", stacklevel=2)
    return net


def failing_module(exc: BaseException, net: nn.Module) -> tuple[str | None, nn.Module | None]:
    """(name, module) of the innermost submodule of `net` whose code raised `exc` (from the traceback's
    frames), or (None, None): where a forward failed, for its error message."""
    names = {id(m): n for n, m in net.named_modules() if n}
    found = (None, None)
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_locals.get("self")
        if id(module) in names:
            found = (names[id(module)], module)
        tb = tb.tb_next
    return found


def check_model_name(model_name: str) -> None:
    """Refuses a name timm does not know (naming the closest), a weights tag it lacks (naming its tags),
    and Hub / folder names."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        # timm reads such a model's config from the Hub or a folder even without its weights, and a
        # zoo checkpoint must rebuild from its hyper-parameters alone
        raise ValueError(f"model_name {model_name!r}: give a timm architecture name; for published weights "
                         "add their tag and pretrained=True (e.g. model_name 'resnet10t.c3_in1k')")
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name.lower(), timm.list_models(), n=5, cutoff=0.5)
        raise ValueError(f"model_name {model_name!r} is not a registered timm model; closest names: "
                         f"{', '.join(close) or 'none'} (timm.list_models() lists them all)")
    arch, tag = split_model_name_tag(model_name)
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in tags:
        raise ValueError(f"model_name {model_name!r}: {arch} has no published weights tagged {tag!r}; its tags: "
                         f"{', '.join(tags) or 'none'}")


def rejected_kwargs(model_name: str, kwargs: dict, first: str) -> str:
    """What to say when `timm.create_model(model_name, **kwargs)` refused the keyword `first`."""
    with torch.device("meta"):  # only its class is wanted: no weights allocated
        cls = type(timm.create_model(model_name))
    params = inspect.signature(cls).parameters
    takes = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    factory = inspect.signature(timm.create_model).parameters
    rejected = [k for k in kwargs if k not in params and k not in factory] or [first]
    # (a config's model_kwargs are for its own model, and stay when another model_name is given)
    return (f"model_kwargs {rejected} are not arguments of {model_name} (timm class {cls.__name__}); it takes: "
            f"{', '.join(takes)}; model_kwargs null drops all that the config set")
