"""The method registry: the one place an SSL method is declared.

A :class:`MethodSpec` says everything the rest of ssl3d needs to know about a method without importing it:
whether its encoder is sparse (takes a ``backend``), which pretrainer runs it (the generic
``SSLPretrainer`` unless the method brings its own), the trainer's class name (results folder name), the
downstream network nnU-Net builds for fine-tuning and its traits, the optimizer defaults from the method's
paper, and a tiny configuration for tests and CPU demos. ``ssl_pretrain -m`` choices and help, export,
fine-tuning and the parametrized tests all read it. Adding a method = one module with one
``@register_method(...)`` builder (+ its tests); nothing else changes.
"""
from __future__ import annotations

import importlib
import pkgutil
import pydoc
from dataclasses import dataclass, field
from typing import Any, Callable

from ssl3d.training.methods.base import SSLMethod


@dataclass(frozen=True)
class OptimDefaults:
    """Pretraining optimizer defaults of a method (AdamW + per-iteration warm-up/cosine)."""

    lr: float = 1e-4
    scale_lr_with_batch: bool = True  # lr × batch / reference_batch, capped at max_lr
    reference_batch: int = 2
    max_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    grad_clip: float = 3.0
    warmup_fraction: float = 0.05

    def peak_lr(self, global_batch: int) -> float:
        if not self.scale_lr_with_batch:
            return self.lr
        return min(self.max_lr, self.lr * global_batch / self.reference_batch)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    builder: Callable[..., SSLMethod]
    description: str
    sparse: bool = False  # encoder runs on visible voxels only and accepts ``backend``
    trainer_name: str = ""  # pretrainer class name (nnU-Net results folder <trainer>__<plans>__<config>)
    pretrainer: type | str | None = None  # None: the generic SSLPretrainer; str: dotted path, imported lazily
    downstream: str | None = None  # dotted class name nnU-Net builds for fine-tuning (None: not transferable yet)
    transformer: bool = False  # downstream encoder is a transformer (fine-tuning defaults to AdamW)
    single_output: bool = False  # downstream network has no multi-scale outputs (deep supervision off)
    optim: OptimDefaults = field(default_factory=OptimDefaults)
    mask_ratio: float | None = None  # the paper's ratio (None: the plans' mask_ratio)
    tiny: dict[str, Any] = field(default_factory=dict)  # kwargs of a tiny configuration (tests, CPU demos)
    checkpointing: bool = False  # has checkpoint_stages (ssl_pretrain --checkpoint-activations)

    def build(self, plans: dict, configuration: dict, num_input_channels: int, **kwargs) -> SSLMethod:
        return self.builder(plans, configuration, num_input_channels, **kwargs)

    def pretrainer_base(self) -> type | None:
        return pydoc.locate(self.pretrainer) if isinstance(self.pretrainer, str) else self.pretrainer


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, description: str, **spec: Any) -> Callable:
    """Decorator for ``builder(plans, configuration, num_input_channels, **kwargs) -> SSLMethod``; ``spec`` are
    the :class:`MethodSpec` fields (``sparse``, ``downstream``, ``optim``, ``tiny``, ...)."""

    def wrap(builder: Callable[..., SSLMethod]) -> Callable[..., SSLMethod]:
        if name in _REGISTRY:
            raise ValueError(f"SSL method '{name}' registered twice")
        spec.setdefault("trainer_name", f"{name[:1].upper()}{name[1:]}Pretrainer")
        _REGISTRY[name] = MethodSpec(name, builder, description, **spec)
        return builder

    return wrap


def unregister_method(name: str) -> None:
    """Remove a method (tests that register throw-away methods clean up with this)."""
    _REGISTRY.pop(name, None)


def method_specs() -> dict[str, MethodSpec]:
    _import_all()
    return dict(sorted(_REGISTRY.items()))


def available_methods() -> dict[str, str]:
    return {k: v.description for k, v in method_specs().items()}


def get_method_spec(name: str) -> MethodSpec:
    specs = method_specs()
    if name not in specs:
        raise KeyError(f"unknown SSL method '{name}'; available: {', '.join(specs)}")
    return specs[name]


def spec_for_network(network_class_name: str) -> MethodSpec | None:
    """The method whose downstream network is this class (matched by full or bare class name)."""
    bare = network_class_name.rsplit(".", 1)[-1]
    for spec in method_specs().values():
        if spec.downstream and (spec.downstream == network_class_name or spec.downstream.rsplit(".", 1)[-1] == bare):
            return spec
    return None


def build_method(name: str, plans: dict, configuration: dict, num_input_channels: int, **kwargs) -> SSLMethod:
    """Instantiate a registered method for a plans configuration (``configuration`` is the plans sub-dict)."""
    return get_method_spec(name).build(plans, configuration, num_input_channels, **kwargs)


def _import_all() -> None:
    import ssl3d.training.methods as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "registry", "heads"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")
