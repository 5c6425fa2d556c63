"""Networks of the zoo, one module per family. Importing this package registers them with timm
(`timm.create_model("unet")`)."""
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

__all__ = ["UNet", "DoubleConv", "Down", "Up", "InputSizes", "valid_input_sizes", "check_input_size",
           "output_size", "input_size_for_output", "tiled_predict", "whole_image_predict", "seam_error"]
