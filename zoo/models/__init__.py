"""Networks of the zoo, one module per family. Importing this package registers them with timm
(`timm.create_model("unet")`); `create_model` builds any timm-registered network by name."""
import difflib
import inspect
import re

import timm
import torch
from timm.models import split_model_name_tag
from torch import nn

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

__all__ = ["create_model", "UNet", "DoubleConv", "Down", "Up", "InputSizes", "valid_input_sizes",
           "check_input_size", "output_size", "input_size_for_output", "tiled_predict", "whole_image_predict", "seam_error"]


def create_model(model_name: str, **kwargs) -> nn.Module:
    """`timm.create_model(model_name, **kwargs)`, with a one-line ValueError for a name timm does not
    know (naming the closest registered names), a weights tag it does not have (naming its tags) or
    keyword arguments the model does not take (naming them and the ones it takes)."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        # timm reads such a model's config from the Hub or a folder even without its weights, and a
        # zoo checkpoint must rebuild from its hyper-parameters alone
        raise ValueError(f"model_name {model_name!r}: give a timm architecture name; for published weights "
                         "add their tag and pretrained=True (e.g. model_name 'resnet10t.c3_in1k')")
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.5)
        raise ValueError(f"model_name {model_name!r} is not a registered timm model; closest names: "
                         f"{', '.join(close) or 'none'} (timm.list_models() lists them all)")
    arch, tag = split_model_name_tag(model_name)
    tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in tags:
        raise ValueError(f"model_name {model_name!r}: {arch} has no published weights tagged {tag!r}; its tags: "
                         f"{', '.join(tags) or 'none'}")
    try:
        return timm.create_model(model_name, **kwargs)
    except TypeError as e:
        first = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if first is None:
            raise
        with torch.device("meta"):  # only its class is wanted: no weights allocated
            cls = type(timm.create_model(model_name))
        params = inspect.signature(cls).parameters
        takes = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        factory = inspect.signature(timm.create_model).parameters
        rejected = [k for k in kwargs if k not in params and k not in factory] or [first[1]]
        raise ValueError(f"model_kwargs {rejected} are not arguments of {model_name} (timm class "
                         f"{cls.__name__}); it takes: {', '.join(takes)}") from e
