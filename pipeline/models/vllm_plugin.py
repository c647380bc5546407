"""vLLM general plugin for the CPU engine: a dense fallback for 4-bit (WNA16) linear layers on CPUs
that lack vLLM's kernel, and a repair of vLLM's compile cache so that an engine start loads the
model it compiled before instead of compiling it again.

vLLM's CPU backend runs AWQ and GPTQ checkpoints through one path: ``AutoAWQMarlinLinearMethod``
(AWQ, after converting the checkpoint to the GPTQ-like layout) and ``AutoGPTQLinearMethod`` both
ask ``choose_mp_linear_kernel`` for a mixed-precision kernel, and on x86 CPUs that is
``CPUWNA16LinearKernel``, whose forward pass calls the C++ op ``torch.ops._C.cpu_gemm_wna16``.
The AVX2 build of vLLM's CPU library (``_C_AVX2``, loaded on CPUs without AVX-512) does not
contain that op, so the model loads and then fails on its first forward pass.

Where the op is missing, `register` swaps ``CPUWNA16LinearKernel`` in vLLM's CPU kernel list for
`DenseWNA16LinearKernel`, which dequantizes each layer once, after its weights are loaded, into a
dense weight in the model's dtype and from then on runs the same dense matmul vLLM uses for
unquantized layers on CPU (oneDNN where it can, else ``torch.nn.functional.linear``). The packed
tensors are freed, so the model takes the memory of a float16/bfloat16 model, not of a 4-bit one.
Nothing else in vLLM changes: the quantization configs, weight loading (and AWQ's repacking),
LoRA's wrapping of the base layer and the dense CPU GEMM are vLLM's own.

Where the op exists, on GPUs and on other platforms, `register` does nothing. The environment
variable ``PIPELINE_WNA16_FALLBACK`` overrides the detection: ``auto`` (default), ``on`` (use the
fallback even where the op exists; what the tests use on AVX-512 machines) or ``off``.

The compile cache. On the CPU vLLM 0.32 compiles the model with torch's own inductor backend
(``CpuPlatform.check_and_update_config``: ``DYNAMO_TRACE_ONCE`` with ``backend="inductor"``) and
saves it with torch's AOT compile, which wraps inductor's output in
``BundledAOTAutogradSerializableCallable``. vLLM's loader (``_try_load_aot_compiled_fn`` in
``vllm.compilation.decorators``) then calls ``finalize_loading(vllm_config)`` on what it loaded, a
method only vLLM's own backend's ``VllmSerializableFunction`` has, so every load fails with
"Compiling model again due to a load failure ... 'function' object has no attribute
'finalize_loading'" and each engine start pays a full compile (about half of a tiny model's
start). The bundle's deserializer has already loaded the compiled code, so there is nothing left to
finalize: `repair_compile_cache` gives the bundle class a ``finalize_loading`` that does nothing,
and the cached model loads. Outputs are the same token for token (the same compiled graph runs).
Where the class already has the method (a vLLM/torch that fixed it) or does not exist, it does
nothing; ``PIPELINE_COMPILE_CACHE_REPAIR=off`` turns it off.

vLLM finds `register` through the ``vllm.general_plugins`` entry point in pyproject.toml and calls
it in every process it starts (front end, engine core, workers), possibly more than once per
process; registering again is a no-op.
"""

from __future__ import annotations

import os

import torch
from vllm.logger import init_logger

ENV_VAR = "PIPELINE_WNA16_FALLBACK"
COMPILE_CACHE_ENV_VAR = "PIPELINE_COMPILE_CACHE_REPAIR"
_MODES = {"auto": "auto", "on": "on", "1": "on", "true": "on", "off": "off", "0": "off", "false": "off"}
# vLLM configures handlers for the "vllm" logger tree only; a logger below it shows up in the
# engine's log, prefixed with the process it runs in.
logger = init_logger("vllm.pipeline_wna16_fallback")


def fallback_mode() -> str:
    """``auto``, ``on`` or ``off``, from ``PIPELINE_WNA16_FALLBACK``."""
    raw = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if raw not in _MODES:
        raise ValueError(f"{ENV_VAR}={raw!r}: expected one of auto, on, off")
    return _MODES[raw]


def native_wna16_kernel_available() -> bool:
    """Whether the CPU library vLLM loaded for this machine has the 4-bit matmul op."""
    from vllm.platforms import current_platform

    # vLLM picks _C, _C_AVX512 or _C_AVX2 by the CPU's ISA; this loads the same one.
    current_platform.import_kernels()
    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def register() -> bool:
    """Install the dense fallback if this process needs it, and repair the compile cache's loading
    (`repair_compile_cache`); True when the dense fallback is (now or already) active.

    Off the CPU this imports nothing but vLLM's platform module: vLLM runs it in every process it
    starts, GPU ones included, before any model code is loaded.
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        repair_compile_cache()
    mode = fallback_mode()
    if mode == "off" or not current_platform.is_cpu():
        return False
    if mode == "auto" and native_wna16_kernel_available():
        return False
    return _install(reason="forced by PIPELINE_WNA16_FALLBACK=on" if mode == "on" else "no cpu_gemm_wna16 op in this vLLM build")


def repair_compile_cache() -> bool:
    """Let vLLM load the CPU engine's compiled model from its compile cache (see the module's
    docstring); True when the loader can (now or already), False when turned off or not needed."""
    if _MODES.get(os.environ.get(COMPILE_CACHE_ENV_VAR, "auto").strip().lower() or "auto", "auto") == "off":
        return False
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as bundle
    except ImportError:  # a torch without AOT compile: vLLM does not save or load one either
        return False
    if hasattr(bundle, "finalize_loading"):  # ours already, or a torch/vLLM that fixed it: theirs stands
        return True
    bundle.finalize_loading = _nothing_to_finalize
    logger.debug("compile cache: inductor bundles load without vLLM's finalize_loading")
    return True


def _nothing_to_finalize(self, vllm_config) -> None:
    """The bundle's deserializer loaded the compiled code already; vLLM's loader asks anyway."""


def is_active() -> bool:
    """Whether the dense kernel is in vLLM's CPU kernel list in this process."""
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS
    from vllm.platforms import PlatformEnum

    return dense_wna16_kernel() in _POSSIBLE_KERNELS.get(PlatformEnum.CPU, [])


def _install(reason: str) -> bool:
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS, CPUWNA16LinearKernel
    from vllm.platforms import PlatformEnum

    dense = dense_wna16_kernel()
    kernels = _POSSIBLE_KERNELS.get(PlatformEnum.CPU, [])
    if dense in kernels:
        return True
    if CPUWNA16LinearKernel not in kernels:
        logger.warning(
            "WNA16 dense fallback not installed: CPUWNA16LinearKernel is not in vLLM's CPU kernel "
            "list (vLLM changed); 4-bit models run with whatever kernel vLLM picks."
        )
        return False
    # In place, at the same priority: choose_mp_linear_kernel reads this very list.
    kernels[kernels.index(CPUWNA16LinearKernel)] = dense
    logger.info(
        "WNA16 dense fallback active (%s): 4-bit AWQ/GPTQ linear layers are dequantized once at "
        "load and run as dense matmuls in the model dtype.",
        reason,
    )
    return True


def dequantize_wna16(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | int, group_size: int
) -> torch.Tensor:
    """The float32 weight [out, in] of unpacked 4-bit values.

    `q` is [in, out] (integers), `scales` [groups, out], `zeros` [groups, out] or one integer (the
    type's bias for symmetric types: 8 for uint4b8). A value q stands for (q - zero) * scale.
    """
    in_features, out_features = q.shape
    group = in_features if group_size == -1 else group_size
    # In place, so that loading holds at most one float32 copy of the layer besides `q`.
    w = q.to(torch.float32).reshape(-1, group, out_features)
    w.sub_(zeros.to(torch.float32)[:, None, :] if isinstance(zeros, torch.Tensor) else float(zeros))
    # (q - zero) has at most 5 significant bits and a float16/bfloat16 scale at most 11, so the
    # float32 product is exact: casting it to the model dtype is the only rounding.
    w.mul_(scales.to(torch.float32)[:, None, :])
    return w.reshape(in_features, out_features).t()


def _unpack(param: torch.Tensor, weight_type, rows_dim_attr: str, rows_dim: int) -> torch.Tensor:
    """A packed vLLM parameter as integers, oriented so that `rows_dim_attr` is dim `rows_dim`."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32

    values = unpack_quantized_values_into_int32(param.data, weight_type, param.packed_dim)
    return values.t() if getattr(param, rows_dim_attr) != rows_dim else values


_DENSE_KERNEL: type | None = None


def dense_wna16_kernel() -> type:
    """The `DenseWNA16LinearKernel` class (defined on first use: it subclasses vLLM's kernel base,
    whose package pulls in every linear kernel vLLM has)."""
    global _DENSE_KERNEL
    if _DENSE_KERNEL is None:
        _DENSE_KERNEL = _define_dense_kernel()
    return _DENSE_KERNEL


def _define_dense_kernel() -> type:
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearKernel,
        MPLinearLayerConfig,
    )
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform
    from vllm.scalar_type import scalar_types

    class DenseWNA16LinearKernel(MPLinearKernel):
        """4-bit weights dequantized once after loading, then vLLM's dense CPU GEMM."""

        # The types CPUWNA16LinearKernel takes, so a model gets this kernel exactly where it
        # would have got that one.
        SUPPORTED_QUANT_TYPES = (scalar_types.uint4, scalar_types.uint4b8)

        @classmethod
        def get_min_capability(cls) -> int:
            return -1

        @classmethod
        def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
            if not current_platform.is_cpu():
                return False, "the dense WNA16 fallback is for CPUs"
            if c.weight_type not in cls.SUPPORTED_QUANT_TYPES:
                return False, f"quant type {c.weight_type} not supported (supported: uint4, uint4b8)"
            in_features = c.partition_weight_shape[0]
            if c.group_size != -1 and (c.group_size <= 0 or in_features % c.group_size):
                return False, f"group size {c.group_size} does not divide the {in_features} inputs"
            return True, None

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            w_q, w_s, w_zp = self._get_weight_params(layer)
            # vLLM hands AWQ (after its repacking) and GPTQ weights over as [in, out] packed along
            # the input dim; compressed-tensors as [out, in]. Each parameter says which dim is which.
            q = _unpack(w_q, self.config.weight_type, "input_dim", 0)  # [in, out]
            scales = w_s.data.t() if getattr(w_s, "output_dim", 1) == 0 else w_s.data  # [groups, out]
            if self.config.zero_points and w_zp is not None:
                zeros = _unpack(w_zp, self.config.weight_type, "output_dim", 1)  # [groups, out]
            else:
                zeros = self.config.weight_type.bias
            dtype = w_s.dtype
            logger.info_once(
                "WNA16 dense fallback: dequantizing 4-bit linear layers to dense %s weights at load", dtype
            )
            weight = dequantize_wna16(q, scales, zeros, self.config.group_size)
            for name in (self.w_q_name, self.w_s_name, self.w_zp_name):
                if name and name in layer._parameters:
                    delattr(layer, name)
            layer.register_parameter(
                "weight", torch.nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
            )
            # Sets layer.cpu_linear: the GEMM vLLM picked for unquantized CPU layers of this shape
            # and dtype (it may repack the weight and empty layer.weight).
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)

        def apply_weights(
            self,
            layer: torch.nn.Module,
            x: torch.Tensor,
            bias: torch.Tensor | None = None,
        ) -> torch.Tensor:
            return layer.cpu_linear(x, layer.weight, bias)

    return DenseWNA16LinearKernel
