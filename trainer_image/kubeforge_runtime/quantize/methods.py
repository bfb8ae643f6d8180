"""Quantization methods: a small protocol and a name -> implementation registry.

Called by :mod:`kubeforge_runtime.quantize.runner`. Each method knows three things:

* whether this machine can run it (``check_supported``), decided in well under a second by
  quantizing and running one small ``nn.Linear`` before any model is loaded, so a method
  the hardware cannot run fails at once with a message naming an alternative;
* how to load a model quantized (``load_quantized``): through
  ``AutoModelForCausalLM.from_pretrained(..., quantization_config=TorchAoConfig(...))``,
  transformers' own torchao integration, which applies torchao's ``quantize_`` to every
  ``nn.Linear`` except the output embedding; then, for the int8 and int4 methods with
  ``embeddings=True`` (the API's ``quantizeEmbeddings``, on by default), the input
  embedding and the tied or untied ``lm_head`` are quantized to int8 too, one scale per 32
  values of a row (``embeddings.py``): on a small model they are a fifth of the weights;
* how to save it so that ``kubeforge_runtime.models.load_causal_lm`` loads it back
  (``save``).

All methods are built on torchao's ``quantize_`` configs, never on the deprecated
``torch.ao.quantization.quantize_dynamic``. One method calibrates: ``int4-weight-only-awq``
(torchao's AWQ around the int4 config, ``Int4AwqMethod``) runs the calibration windows
through the model to choose per-channel scales; the others ignore calibration data: int8/int4
weight-only and fp16/bf16 need only the weights, and int8-dynamic computes activation scales
per token at run time. torchao and transformers are imported lazily inside the methods, so
importing the registry (e.g. to list names) costs nothing.

int4 on CPU: torchao 0.18's ``Int4WeightOnlyConfig`` packing formats need CUDA or the
``mslk`` GPU kernels; the one CPU path is the prototype ``PrototypeInt4WeightOnlyConfig``
(``Int4OpaqueTensor``, two weights per byte, run by ATen's
``_weight_int4pack_mm_for_cpu``). That tensor class is not in torchao's safetensors
allow-list, so the int4 CPU output is saved as ``pytorch_model.bin`` (pickled tensor
subclass, loadable with ``weights_only=True`` once ``torchao.prototype.quantization.int4``
is imported - it registers the class as a safe global). The lineage file names that module
under ``quantization.loadRequires``; ``kubeforge_runtime.models.load_requirements()`` imports it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from . import embeddings as embedding_quant

log = logging.getLogger(__name__)


class UnsupportedMethodError(RuntimeError):
    """The method cannot run on this hardware/software; the message names an alternative."""


class QuantMethod(Protocol):
    """What the runner needs from a quantization method."""

    name: str
    alternative: str
    """The method to suggest when this one cannot run here."""

    def check_supported(self, device: str, group_size: int) -> None:
        """Raise UnsupportedMethodError (naming ``alternative``) if ``device`` cannot run it."""

    calibrates: bool
    """Whether ``load_quantized`` reads ``calibration`` (the runner passes None otherwise)."""

    def load_quantized(self, model_dir: Path, device: str, group_size: int, embeddings: bool = True,
                       calibration: Sequence[Any] | None = None) -> Any:
        """Load the full-precision model at ``model_dir`` and return it quantized; ``embeddings``:
        also quantize the input and output embeddings where the method supports it;
        ``calibration``: token-id windows (1-D LongTensors) a calibrating method runs through
        the model to observe its activations."""

    def save(self, model: Any, out_dir: Path) -> dict[str, Any]:
        """Save ``model`` to ``out_dir``; return facts for the lineage record."""


# --- helpers -------------------------------------------------------------------------------


def _probe(name: str, alternative: str, device: str, build: Callable[[], Any], in_features: int, dtype: Any) -> None:
    """Quantize and run one small linear layer; raise UnsupportedMethodError on failure.

    Trying the real kernel is the only reliable capability check: torchao's support varies
    by CPU instruction set, CUDA capability and which optional kernel packages are present.
    """
    import torch

    try:
        layer = torch.nn.Linear(in_features, 64, bias=False, dtype=dtype, device=device)
        quantize = build()
        if quantize is not None:
            from torchao.quantization import quantize_

            quantize_(layer, quantize)
        with torch.no_grad():
            out = layer(torch.randn(2, in_features, dtype=dtype, device=device))
        if not torch.isfinite(out.float()).all():
            raise RuntimeError("the probe layer produced non-finite outputs")
    except UnsupportedMethodError:
        raise
    except Exception as exc:  # any failure here means "cannot run", whatever its type
        raise UnsupportedMethodError(
            f"method {name!r} cannot run on this machine ({device}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}; use method {alternative!r} instead"
        ) from exc


def _load(model_dir: Path, device: str, *, dtype: Any = "auto", quant_type: Any = None) -> Any:
    from transformers import AutoModelForCausalLM, TorchAoConfig

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant_type is not None:
        kwargs["quantization_config"] = TorchAoConfig(quant_type=quant_type)
        embedding_quant.register_ops()  # the blockwise int8 linear (and int8 embedding ops)
    if device != "cpu":
        kwargs["device_map"] = device
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    return model.eval()


def _save_pretrained(model: Any, out_dir: Path) -> dict[str, Any]:
    # transformers flattens torchao tensor subclasses into plain tensors plus JSON metadata
    # in the safetensors header; from_pretrained reassembles them (pre-quantized path).
    model.save_pretrained(str(out_dir))
    embedding_quant.drop_tied_duplicate(model, out_dir)
    return {"format": "safetensors", "loadRequires": [], **embedding_quant.facts(model)}


def _with_embeddings(model: Any, quantize: bool) -> Any:
    """``model`` with its input/output embeddings quantized to int8 when ``quantize``."""
    if quantize:
        facts = embedding_quant.quantize_embeddings(model)
        log.info("embeddings quantized: %s", facts)
    return model


def _config_name(quant_type: Any) -> str:
    cls = type(quant_type)
    return f"{cls.__module__}.{cls.__qualname__}"


# --- torchao methods -----------------------------------------------------------------------


@dataclass
class TorchAoMethod:
    """A method that is one torchao config applied by transformers and saved as safetensors."""

    name: str
    alternative: str
    make_config: Callable[[int], Any]
    """group_size -> torchao AOBaseConfig (imports torchao when called)."""
    calibrates: bool = False

    def check_supported(self, device: str, group_size: int) -> None:
        import torch

        _probe(self.name, self.alternative, device, lambda: self.make_config(group_size), 256, torch.float32)

    def load_quantized(self, model_dir: Path, device: str, group_size: int, embeddings: bool = True,
                       calibration: Sequence[Any] | None = None) -> Any:
        return _with_embeddings(_load(model_dir, device, quant_type=self.make_config(group_size)), embeddings)

    def save(self, model: Any, out_dir: Path) -> dict[str, Any]:
        facts = _save_pretrained(model, out_dir)
        facts["torchaoConfig"] = _config_name(model.config.quantization_config.quant_type)
        return facts


def _int8_dynamic(_group_size: int) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


INT8_LINEAR_GROUP = 32
"""Values of a linear layer's row sharing one int8 scale in int8-weight-only. One scale per row
cost the fine-tuned SmolLM2-135M 2 of 100 sentiment records (92 % against 94 %, +0.61 %
perplexity); in groups of 32 it kept all of them (94 %, -0.09 % perplexity) at 0.289x of the
fp32 bytes instead of 0.260x (README "Quantization"). Grouped weights run the blockwise linear
(``int8_linear.py``)."""


def _int8_weight_only(_group_size: int) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig, PerGroup

    return Int8WeightOnlyConfig(granularity=PerGroup(INT8_LINEAR_GROUP))


INT4_CPU_MODULE = "torchao.prototype.quantization.int4"
"""Importing this registers Int4OpaqueTensor for weights_only loading (see module docstring)."""


@dataclass
class Int4WeightOnlyMethod:
    """int4 weights in groups of ``groupSize`` with one scale and zero point per group.

    CPU: torchao's prototype ``PrototypeInt4WeightOnlyConfig`` (the only int4 path torchao
    0.18 runs on CPU), saved as ``pytorch_model.bin``. CUDA: ``Int4WeightOnlyConfig`` with
    the ``tile_packed_to_4d`` (tinygemm) packing, saved as safetensors. On both, the model
    runs in bfloat16 (see ``_dtype``).
    """

    name: str = "int4-weight-only"
    alternative: str = "int8-weight-only"
    calibrates: bool = False

    def _config(self, device: str, group_size: int) -> Any:
        if device == "cpu":
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

            return PrototypeInt4WeightOnlyConfig(group_size=group_size)
        from torchao.quantization import Int4WeightOnlyConfig
        from torchao.quantization.quantize_.workflows import Int4PackingFormat

        # tile_packed_to_4d is tinygemm's CUDA layout; the default (plain) needs the mslk
        # kernels, which are not a torchao dependency.
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)

    def _dtype(self, device: str) -> Any:
        import torch

        # bfloat16 activations on both: the CUDA tinygemm kernel takes nothing else, and the
        # CPU kernel, which also accepts float32, was 17-40x slower with float32 activations
        # than with bfloat16 here (batch-1 decode, 8 layers of 512x1376: ~28 ms vs ~0.7 ms;
        # fp32 dense: ~1.6 ms). The rest of the model (embeddings, norms, lm_head) is then
        # bfloat16 too, which also halves its size.
        return torch.bfloat16

    def check_supported(self, device: str, group_size: int) -> None:
        _probe(
            self.name,
            self.alternative,
            device,
            lambda: self._config(device, group_size),
            2 * group_size,
            self._dtype(device),
        )

    def load_quantized(self, model_dir: Path, device: str, group_size: int, embeddings: bool = True,
                       calibration: Sequence[Any] | None = None) -> Any:
        model = _load(model_dir, device, dtype=self._dtype(device), quant_type=self._config(device, group_size))
        return _with_embeddings(model, embeddings)

    def save(self, model: Any, out_dir: Path) -> dict[str, Any]:
        quant_type = model.config.quantization_config.quant_type
        config_name = _config_name(quant_type)
        if type(quant_type).__name__ != "PrototypeInt4WeightOnlyConfig":
            facts = _save_pretrained(model, out_dir)
            facts["torchaoConfig"] = config_name
            return facts
        import torch
        from torchao.quantization import Int4WeightOnlyConfig
        from transformers import TorchAoConfig

        # transformers resolves config.json's quant_type only among torchao's public modules,
        # where the prototype config is not exported. Int4WeightOnlyConfig with the same
        # group size and the same (tinygemm) scale/zero-point algorithm describes the same
        # numbers; the packed layout travels with the pickled weight tensors themselves, and
        # the lineage record names the exact config. Loading never re-quantizes: a
        # pre-quantized checkpoint's weights are taken as they are.
        group_size = quant_type.group_size
        with_embeddings = embedding_quant.embeddings_quantized(model)
        original = model.config.quantization_config
        model.config.quantization_config = TorchAoConfig(
            quant_type=Int4WeightOnlyConfig(group_size=group_size), include_input_output_embeddings=with_embeddings
        )
        try:
            model.config.save_pretrained(str(out_dir))
        finally:
            model.config.quantization_config = original
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(out_dir))
        state = model.state_dict()
        head = model.get_output_embeddings()
        if head is not None and head.weight is model.get_input_embeddings().weight:
            # A tied lm_head: one copy on disk; transformers ties it again on reload.
            for name, module in model.named_modules():
                if module is head:
                    state.pop(f"{name}.weight", None)
        torch.save(state, out_dir / "pytorch_model.bin")
        return {"format": "pytorch", "loadRequires": [INT4_CPU_MODULE], "torchaoConfig": config_name,
                **embedding_quant.facts(model)}


@dataclass
class Int4AwqMethod(Int4WeightOnlyMethod):
    """int4 weight-only with AWQ (activation-aware weight quantization) calibrated on your data.

    torchao's ``torchao.prototype.awq.AWQConfig`` around the same int4 config as
    ``int4-weight-only`` (so the same kernel runs it, on CPU and CUDA): step ``prepare`` wraps
    every linear layer (``lm_head`` excepted, and layers whose input width ``groupSize`` does
    not divide, which stay in full precision as in ``int4-weight-only``) in an observer; the
    calibration windows are run through the model one at a time; step ``convert`` then picks,
    per layer, the per-input-channel scale ``s = mean|x|^r`` (``r`` searched over a grid) that
    minimises the output error of ``quantize(W * s) @ (x / s)`` on the observed inputs, and
    stores ``1/s`` in the int4 weight as its activation pre-scale. Different calibration data
    gives different scales and so different int4 weights.

    The observers keep every calibration input of every layer in memory (bfloat16): about
    300 KB per calibration token for SmolLM2-135M (30 layers), so 8 k tokens need ~2.4 GB;
    the scale search costs ~20 matmuls per layer over all of them.
    """

    name: str = "int4-weight-only-awq"
    alternative: str = "int4-weight-only"
    calibrates: bool = True

    def load_quantized(self, model_dir: Path, device: str, group_size: int, embeddings: bool = True,
                       calibration: Sequence[Any] | None = None) -> Any:
        import torch
        from torchao.prototype.awq import AWQConfig
        from torchao.quantization import quantize_
        from transformers import TorchAoConfig

        if not calibration:
            raise ValueError(f"{self.name} needs calibration windows (calibration.uri)")
        base = self._config(device, group_size)
        model = _load(model_dir, device, dtype=self._dtype(device))
        head = model.get_output_embeddings()

        def quantizable(module: Any, _fqn: str) -> bool:
            return isinstance(module, torch.nn.Linear) and module is not head and module.in_features % group_size == 0

        quantize_(model, AWQConfig(base, step="prepare"), filter_fn=quantizable)
        tokens = 0
        with torch.no_grad():
            for window in calibration:
                model(input_ids=window.unsqueeze(0).to(model.device))
                tokens += len(window)
        log.info("AWQ: observed %d calibration windows (%d tokens)", len(calibration), tokens)
        quantize_(model, AWQConfig(base, step="convert"))  # converts the observed layers only
        # What save() and the lineage read: the int4 config the weights were quantized with.
        model.config.quantization_config = TorchAoConfig(quant_type=base)
        return _with_embeddings(model, embeddings)


# --- dtype casts -----------------------------------------------------------------------


@dataclass
class CastMethod:
    """Cast every floating-point weight to a 16-bit float type (no torchao config needed)."""

    name: str
    alternative: str
    dtype_name: str
    calibrates: bool = False

    def check_supported(self, device: str, group_size: int) -> None:
        import torch

        _probe(self.name, self.alternative, device, lambda: None, 256, getattr(torch, self.dtype_name))

    def load_quantized(self, model_dir: Path, device: str, group_size: int, embeddings: bool = True,
                       calibration: Sequence[Any] | None = None) -> Any:
        import torch

        # A cast already covers the embeddings; there is nothing more to quantize.
        return _load(model_dir, device, dtype=getattr(torch, self.dtype_name))

    def save(self, model: Any, out_dir: Path) -> dict[str, Any]:
        model.save_pretrained(str(out_dir))
        return {"format": "safetensors", "loadRequires": [], "dtype": self.dtype_name}


# --- registry ------------------------------------------------------------------------------

REGISTRY: dict[str, Callable[[], QuantMethod]] = {
    "int8-dynamic": lambda: TorchAoMethod("int8-dynamic", "int8-weight-only", _int8_dynamic),
    "int8-weight-only": lambda: TorchAoMethod("int8-weight-only", "bf16", _int8_weight_only),
    "int4-weight-only": lambda: Int4WeightOnlyMethod(),
    "int4-weight-only-awq": lambda: Int4AwqMethod(),
    # fp16 matmuls are slow or missing on many CPUs; bf16 has the same size and fp32's range.
    "fp16": lambda: CastMethod("fp16", "bf16", "float16"),
    "bf16": lambda: CastMethod("bf16", "int8-weight-only", "bfloat16"),
}
"""Method name -> factory. Factories are cheap; heavy imports happen inside the methods."""


def get_method(name: str) -> QuantMethod:
    """Return the implementation of ``name``; KeyError lists the known names."""
    try:
        return REGISTRY[name]()
    except KeyError:
        raise KeyError(f"unknown quantization method {name!r}; known: {', '.join(REGISTRY)}") from None
