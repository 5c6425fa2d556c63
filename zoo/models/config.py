"""Network configs: a model's architecture as one frozen dataclass, made from its network's keyword
arguments so that the signature is written once, in the network. A task takes the config whole
(`--model.net.norm batch`, `net: {depth: 4}` in a config file) and builds the network from it plus
the values its data fixes (`given`: vocabulary sizes, classes, context length); checkpoints and
exports hold it as a plain dict, which `of` turns back into the config.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing

import torch.nn as nn


def network_config(network: type[nn.Module], given: tuple[str, ...] = ()) -> type:
    """A frozen dataclass `<Network>Config` of `network`'s arguments except `given`, with the network's
    defaults; `network`'s arguments outside `given` must all be named, annotated (the CLI parses them
    by type) and have immutable defaults (a tuple, not a list: the config is frozen)."""
    hints = typing.get_type_hints(network.__init__)
    params = [p for p in inspect.signature(network).parameters.values() if p.name not in given]
    problems = [f"*{p.name}" if p.kind is p.VAR_POSITIONAL else f"**{p.name}" for p in params
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    problems += [f"{p.name} (no default; or list it in `given`)" for p in params if p.default is p.empty]
    problems += [f"{p.name} (no type annotation)" for p in params if p.name not in hints]
    problems += [f"{p.name} (a mutable default {p.default!r}; give a tuple)" for p in params
                 if isinstance(p.default, (list, dict, set))]
    if problems:
        raise TypeError(f"network_config({network.__name__}): its arguments must be named, annotated and have "
                        f"immutable defaults: {', '.join(problems)}")
    name = f"{network.__name__}Config"
    cls = dataclasses.make_dataclass(name, [(p.name, hints[p.name], dataclasses.field(default=p.default))
                                            for p in params], frozen=True,
                                     namespace={"build": _build, "of": classmethod(_of)})
    cls.__module__, cls.__qualname__ = network.__module__, name
    # the network's docstring documents the fields (jsonargparse shows it in --help)
    cls.__doc__ = f"`{network.__name__}`'s architecture, less {', '.join(given) or 'nothing'} (from the data).\n\n" \
                  + inspect.cleandoc(network.__doc__ or "")
    cls.network, cls.given = network, given
    return cls


def _build(self, **given) -> nn.Module:
    """The network of this config and the data's `given` values (exactly the declared ones)."""
    if set(given) != set(self.given):
        raise TypeError(f"{type(self).__name__}.build needs {sorted(self.given)}, got {sorted(given)}")
    return self.network(**dataclasses.asdict(self), **given)


def _of(cls, value):
    """The config from itself, a dict (a checkpoint's hyper-parameters; unknown keys are refused, naming
    them) or None (the defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"a {cls.__name__} or a dict of its fields is needed, got {type(value).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields: {', '.join(fields)}")
    return cls(**value)


def flat(tree, prefix: str = "") -> dict:
    """Nested config values (dicts, jsonargparse Namespaces, dataclasses) as {dotted key: value}, with
    tuples as lists: two configs compare as plain data whichever form they were read in."""
    if dataclasses.is_dataclass(tree):
        tree = dataclasses.asdict(tree)
    out = {}
    for key, value in (tree.as_dict() if hasattr(tree, "as_dict") else tree).items():
        if isinstance(value, dict) or hasattr(value, "as_dict") or dataclasses.is_dataclass(value):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out
