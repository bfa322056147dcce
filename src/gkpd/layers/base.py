"""What the Kronecker conv and linear layers share: the factors, the path, the cost.

A layer's **path** is how it runs: ``"auto"`` (chosen per input size), one of the two
**stage orders** (``"b_first"``, ``"a_first"``: which factor's convolution runs first), a
channel path (``CHANNEL_PATHS``) or the weight path (``WEIGHT_PATH``). "Order" names only
the two stage orders (``gkpd.counting.ORDERS``, ``order_macs``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from gkpd.counting import ORDERS
from gkpd.decompose import KroneckerFactors, decompose, kron_sum
from gkpd.deprecation import renamed
from gkpd.whiten import DEFAULT_DAMPING, decompose_whitened

# "weight": run the dense op with the reconstructed weight Σ_r a[r] ⊗ b[r] (cached at
# inference). As fast as the dense layer whatever the factor shapes, at the factors' size.
WEIGHT_PATH = "weight"
# The two stages as plain convolutions over channels (the batch never grows), for the factor
# shapes that allow it (``channel_paths``); MACs as in the stage order each is named after.
# Fast where grouped and depthwise convolutions are, e.g. in channels_last.
CHANNEL_PATHS = {"b_first_channels": "b_first", "a_first_channels": "a_first"}
PATH_CHOICES = ("auto", *ORDERS, WEIGHT_PATH, *CHANNEL_PATHS)
ORDER_CHOICES = PATH_CHOICES  # its name before paths were named apart from stage orders


# a layer keeps the recorded forwards of this many input signatures; a model fed ever new
# input sizes would otherwise keep one (and its weights' references) for each
_MAX_REPLAYS = 8


class Steps:
    """A forward taken one tensor operation at a time, each kept: ``step(x, op)`` returns
    ``op(x)``. At inference a layer replays the steps for the next input of the same shape,
    strides and dtype, skipping the Python that chose them (the checks, the path, the
    reshapes' sizes, the weights' cache lookups): on ResNet-32's layers at batch 1 that
    Python took 5-10 µs of a 30-60 µs forward (CPU, 2 threads). The ops must not read
    anything but their input and what they captured when recorded."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[Callable[[Tensor], Tensor]] = []

    def __call__(self, x: Tensor, op: Callable[[Tensor], Tensor]) -> Tensor:
        self.ops.append(op)
        return op(x)

    def replay(self, x: Tensor) -> Tensor:
        for op in self.ops:
            x = op(x)
        return x


def in_func_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is running: its tensors
    are wrappers without storage or strides of their own."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def fx_leaf_call(module: nn.Module, *args):
    """The call of ``module`` as one ``call_module`` node of the torch.fx graph being traced
    (the first argument is a ``torch.fx.Proxy``), as fx records torch's own layers. A gkpd
    layer's forward depends on its input's size, which a symbolic trace does not know; the
    traced graph calls the layer, which then runs as it would outside the graph."""
    tracer = args[0].tracer
    path = tracer.path_of_module(module)
    if not path:  # the traced module itself: a graph cannot call its own root
        raise TypeError(
            f"torch.fx.symbolic_trace cannot trace a {type(module).__name__} alone (its forward "
            "depends on the input's size): trace a module that holds it"
        )
    return tracer.create_proxy("call_module", path, args, {})


def refuse_script(module: nn.Module | str, why: str) -> None:
    """What ``__prepare_scriptable__`` (called by ``torch.jit.script`` before it compiles)
    raises for a gkpd layer (or the model type named): a clear error naming the ways that
    work, not a deep one."""
    name = module if isinstance(module, str) else type(module).__name__
    raise TypeError(
        f"torch.jit.script cannot compile {name}: {why}. Use "
        "torch.jit.trace(model, example_input), torch.export.export or torch.fx.symbolic_trace, "
        "or gkpd.export.merge(model) for dense layers"
    )


def memory_bytes(device: torch.device) -> int | None:
    """The memory of ``device`` (the host's RAM for the CPU), or ``None`` when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def refuse_oversized(layer: nn.Module, path: str, elements: int, like: Tensor) -> None:
    """Raise a clear ``MemoryError`` before a forced stage order builds a tensor between its
    stages larger than the device's memory (a split such as ``a_shape=(1, C, 1, 1)`` run
    ``"b_first"`` folds every input channel into the batch), instead of torch's allocator
    failing deep inside a convolution, or the host swapping."""
    needed = elements * like.element_size()
    limit = memory_bytes(like.device)
    if limit is not None and needed > limit:
        raise MemoryError(
            f"{type(layer).__name__} path={path!r} would build a tensor of {needed:,} bytes "
            f"between its stages for an input of shape {tuple(like.shape)}, more than the "
            f"{limit:,} bytes of memory of {like.device}: set path='auto' (the order with "
            "fewer MACs) or a smaller batch"
        )


def check_sizes(**sizes: object) -> None:
    """Each of ``sizes`` (an argument name and its value) must be a positive int."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def dense_factors(
    weight: Tensor,
    a_shape: Sequence[int],
    rank: int | None,
    input_covariance: Tensor | None,
    damping: float | None,
) -> KroneckerFactors:
    """The factors ``from_dense`` starts from: the GKPD of ``weight`` or, given the second
    moment of the layer's input vectors, the one that minimises the output error on them."""
    if input_covariance is None:
        if damping is not None:
            raise ValueError("damping is used only with an input_covariance")
        return decompose(weight.detach(), a_shape, rank=rank)
    if not isinstance(input_covariance, Tensor):
        raise TypeError(
            f"input_covariance must be a torch.Tensor, got {type(input_covariance).__name__}"
        )
    return decompose_whitened(
        weight.detach(), input_covariance, a_shape, rank=rank,
        damping=DEFAULT_DAMPING if damping is None else damping,
    )


class ReconstructedWeight:
    """``weight``: what a factored layer reads like to a parent module that reads its child's
    ``weight`` (Hugging Face's T5 checks ``wo.weight.dtype`` before it calls ``wo``): the dense
    weight the layer stands for, ``reconstruct_weight()``. Built on each read and not kept, so
    the model's memory stays that of its factors; read-only (change the factors instead). The
    Kronecker and tensor-train/ring layers and the baselines' ``Stages`` have it."""

    # torch.jit.script compiles a module's properties: a parent's forward that needs the
    # weight cannot be scripted anyway, and without it a Stages (plain layers) scripts
    __jit_unused_properties__ = ["weight"]

    @property
    def weight(self) -> Tensor:
        return self.reconstruct_weight()

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(
            f"{type(self).__name__}.weight is built from the layer's factors and cannot be "
            "assigned: change the factors, or use a dense layer"
        )


class KroneckerLayer(ReconstructedWeight, nn.Module):
    """Base of the Kronecker layers: parameters ``a`` ``(R, *a_shape)`` and ``b``
    ``(R, *b_shape)``; subclasses give ``order_macs`` and ``resolve_path``."""

    a: nn.Parameter
    b: nn.Parameter
    _path: str = "auto"

    _weight_cache: dict[str, tuple[tuple, Tensor]] | None = None
    # (path, input shape, dtype, device) of the inputs a forced stage order was checked to fit
    _fits: set[tuple] | None = None

    def __init__(self) -> None:
        super().__init__()
        # recorded forwards (``Steps.replay``) by the input and factor state they hold for
        self._replays: dict[tuple, Callable[[Tensor], Tensor]] = {}

    @property
    def path(self) -> str:
        """How the layer runs: ``"auto"`` (the cheaper stage order for each input size),
        ``"b_first"``, ``"a_first"``, ``"weight"`` (the dense op with the reconstructed
        weight), or one of ``channel_paths()``."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in PATH_CHOICES:
            raise ValueError(f"path {value!r} is not supported: expected one of {PATH_CHOICES}")
        if value in CHANNEL_PATHS and value not in self.channel_paths():
            raise ValueError(
                f"path {value!r} needs other factor shapes (a_shape={self.a_shape}, "
                f"b_shape={self.b_shape}): this layer has {self.channel_paths() or 'none'}"
            )
        self._path = value

    order = renamed("order", "path")

    def channel_paths(self) -> tuple[str, ...]:
        """The ``CHANNEL_PATHS`` this layer's factor shapes allow."""
        return ()

    def __prepare_scriptable__(self):
        refuse_script(self, "its forward picks a stage order for each input size in Python")

    def _apply(self, fn, recurse=True):
        # model.to(memory_format=torch.channels_last) converts every 4-d and 5-d tensor, and
        # refuses ranks other than the format's: the factors carry a leading rank dim (a
        # Conv2d's are 5-d). Their layout is irrelevant, so convert them at the rank it needs.
        def convert(t: Tensor) -> Tensor:
            try:
                return fn(t)
            except RuntimeError as error:
                if "channels_last" not in str(error) or t.dim() not in (4, 5):
                    raise
                if t.dim() == 5:
                    return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2])
                return fn(t.unsqueeze(0)).squeeze(0)

        return super()._apply(convert, recurse)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return fx_leaf_call(self, x)
        key = self._replay_key(x)
        replay = None if key is None else self._replays.get(key)
        if replay is not None:
            return replay(x)
        steps = Steps()
        y = self._run(x, steps)
        if key is None:  # nothing stale survives training, whichever path runs
            self._replays.clear()
            self._weight_cache = None
        else:
            if len(self._replays) >= _MAX_REPLAYS:  # inputs of ever new sizes: bound memory
                self._replays.clear()
            self._replays[key] = steps.replay
        return y

    def _run(self, x: Tensor, step: Steps) -> Tensor:
        """The forward, each tensor operation taken through ``step``."""
        raise NotImplementedError

    def _keeps_nothing(self) -> bool:
        """Whether no tensor derived from the factors and no recorded forward may be kept:
        in training, with gradients, while traced or compiled (a kept tensor would be traced
        as a constant), inside a ``torch.func`` transform (the factors are then batched or
        functional tensors: an ensemble's ``vmap`` over stacked parameters), and under
        autocast (a weight built there is in its lower precision, and the next call outside
        it failed on the dtype)."""
        return (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.jit.is_tracing() or in_func_transform()
                or torch._C._is_any_autocast_enabled())

    def _replay_key(self, x: Tensor) -> tuple | None:
        """What a recorded forward is valid for, or ``None`` where none is kept
        (:meth:`_keeps_nothing`, and factors that are not plain parameters: a parametrization
        computes them anew)."""
        if self._keeps_nothing():
            return None
        params = self._parameters
        a, b, bias = params.get("a"), params.get("b"), params.get("bias")
        if a is None or b is None:
            return None
        # the bias's storage and version too: ``bias.data = t`` keeps the Parameter object
        bias_state = None if bias is None else (bias, bias._version, bias.data_ptr())
        return (x.shape, x.stride(), x.dtype, self._path, a._version, b._version,
                a.data_ptr(), b.data_ptr(), bias_state)

    def clear_cache(self) -> None:
        """Drop the weights derived from the factors and the recorded forwards kept for
        inference. Needed only after the factors or the bias were changed through ``.data``
        (``p.data.mul_(...)``), which torch's version counters do not see; changes made to the
        parameters themselves (an optimizer step, ``p.copy_(...)`` under ``torch.no_grad()``,
        ``load_state_dict``, a new tensor assigned to ``p.data``) are noticed."""
        self._replays.clear()
        self._weight_cache = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._replays = {}

    def __getstate__(self) -> dict:
        # the recorded forwards are closures over this layer's weights, and the cached weights
        # may be views of them (which copy.deepcopy refuses once the factors have been
        # trained in place): a copy builds its own
        state = super().__getstate__()
        state.pop("_replays", None)
        state.pop("_weight_cache", None)
        return state

    def _refuse_oversized(self, path: str, x: Tensor, between: Callable[[], int]) -> None:
        """:func:`refuse_oversized` for a forced stage order, ``between()`` the elements of its
        tensor between the stages; checked once per input shape, dtype and device (working it
        out cost about 50 µs, a sixth of a small conv's forward)."""
        shape = tuple(x.shape)
        if not all(isinstance(s, int) for s in shape):  # symbolic (torch.export): unknown size
            return
        key = (path, shape, x.dtype, x.device)
        if self._fits is None:
            self._fits = set()
        if key not in self._fits:
            refuse_oversized(self, path, between(), x)
            self._fits.add(key)

    def order_macs(self, input_shape: Sequence[int]) -> dict[str, int]:
        raise NotImplementedError

    def resolve_path(self, input_shape: Sequence[int]) -> str:
        """The path that runs for an input of ``input_shape`` (``path``, or what ``"auto"``
        picks)."""
        raise NotImplementedError

    def resolve_order(self, *args: Sequence[int]) -> str:
        """Deprecated name of :meth:`resolve_path`."""
        warnings.warn(f"{type(self).__name__}.resolve_order is deprecated: use .resolve_path",
                      DeprecationWarning, stacklevel=2)
        return self.resolve_path(*args)

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        """MACs of the dense op this layer replaces (what the ``"weight"`` path runs)."""
        raise NotImplementedError

    def macs(self, input_shape: Sequence[int]) -> int:
        """MACs of the forward that runs for an input of ``input_shape``."""
        path = self.resolve_path(input_shape)
        if path == WEIGHT_PATH:
            return self.dense_macs(input_shape)
        return self.order_macs(input_shape)[CHANNEL_PATHS.get(path, path)]

    def reconstruct_weight(self) -> Tensor:
        """The dense weight ``Σ_r a[r] ⊗ b[r]``."""
        return kron_sum(self.a, self.b)

    def _path_weight(self) -> Tensor:
        """The weight the ``"weight"`` path runs with."""
        return self._derived("weight", self.reconstruct_weight)

    def _derived(self, name: str, build: Callable[[], Tensor]) -> Tensor:
        """``build()``, a tensor computed from the factors. At inference (eval mode, no grad,
        not being traced) it is rebuilt only when ``a`` or ``b`` changed; otherwise, and for
        factors that are not plain parameters (a parametrization computes them anew on each
        read, so their versions say nothing), it is built on every call."""
        if self._keeps_nothing():
            self._weight_cache = None
            return build()
        # read from the dict: nn.Module.__getattr__ costs about 0.6 µs a read, a tenth of what
        # a Kronecker layer adds to a small batch-1 convolution's time
        params = self._parameters
        a, b = params.get("a"), params.get("b")
        if a is None or b is None:
            return build()
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), a.dtype, a.device)
        if self._weight_cache is None:
            self._weight_cache = {}
        cached = self._weight_cache.get(name)
        if cached is None or cached[0] != key:
            cached = self._weight_cache[name] = (key, build())
        return cached[1]

    def _copy_from(self, factors: KroneckerFactors, dense: nn.Module) -> None:
        """Take the factors of ``dense.weight`` and ``dense``'s bias (``from_dense``)."""
        with torch.no_grad():
            self.a.copy_(factors.a)
            self.b.copy_(factors.b)
            if dense.bias is not None:
                self.bias.copy_(dense.bias)

    def _copy_into(self, dense: nn.Module) -> nn.Module:
        """Give ``dense`` the reconstructed weight and this layer's bias (``to_dense``)."""
        with torch.no_grad():
            dense.weight.copy_(self.reconstruct_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense


def clear_caches(model: nn.Module) -> None:
    """:meth:`KroneckerLayer.clear_cache` on every Kronecker layer in ``model``: call it after
    changing parameters through ``.data`` (an exponential moving average written as
    ``p.data.mul_(d).add_(q.data, alpha=1 - d)``), which the layers cannot notice."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, KroneckerLayer):
            module.clear_cache()
