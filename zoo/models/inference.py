"""`inference`: the decorator of the networks' generation and decoding methods."""
import functools

import torch


def inference(method):
    """Runs a module's method under `torch.no_grad()` in eval mode (no dropout, running statistics),
    and restores the module's mode afterwards, also when it is called in the middle of training."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return method(self, *args, **kwargs)
        finally:
            self.train(was_training)

    return wrapper
