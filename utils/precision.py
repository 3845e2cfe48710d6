"""The numeric precision a model runs in, chosen by one `--precision` option everywhere.

- fp32: float32 throughout; the default wherever exact parity with the original matters.
- bf16 / fp16: autocast to that dtype around the forward (weights stay float32).
- int8: int8 Linear layers with dynamically quantised activations, CPU only (see `quantize_for_cpu`).
- auto: bf16 where the device runs it natively (CUDA with bf16; CPUs with AVX512-BF16 or AMX), else fp32."""

import contextlib
import copy
import importlib.util

import torch

from utils.cli import SettingError

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "auto")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: str | torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (on the CPU: what torch's capability query,
    `torch.cpu.get_capabilities`, finds; without AVX512-BF16 or AMX, bf16 matmuls are emulated and slow)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if hasattr(torch.cpu, "get_capabilities"):
            capabilities = torch.cpu.get_capabilities()
            return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
        # the torch versions without the public query have these
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(name: str, device: str | torch.device) -> str:
    """The concrete precision for `name` on `device` ('auto' decided); SettingError where it cannot run."""
    if name not in PRECISIONS:
        raise SettingError(f"Unknown precision '{name}'; choose one of {', '.join(PRECISIONS)}.")
    device = torch.device(device)
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "int8" and device.type != "cpu":
        raise SettingError(f"--precision int8 runs on the CPU only: pass --device cpu, not {device}.")
    if name == "int8" and importlib.util.find_spec("torchao") is None:  # an optional dependency
        raise SettingError("--precision int8 needs torchao: pip install -e '.[int8]' (or pip install torchao).")
    return name


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a concrete precision (no-op for fp32 and int8)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def resolve_device(name: str | torch.device | None, setting: str = "--device") -> torch.device:
    """The device named by `setting` (e.g. 'cpu', 'cuda:1'), checked to exist on this machine; None: the
    type of the current accelerator if there is one (no index: a DDP process adds its own), else the CPU."""
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if name is None:
        return torch.device(accelerator.type if accelerator is not None else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SettingError(f"{setting}={name} is not a device name; use e.g. cpu or cuda:0.") from e
    if device.type in ("cpu", "meta"):
        return device
    count = torch.accelerator.device_count() if accelerator is not None and accelerator.type == device.type else 0
    if (device.index or 0) >= count:
        raise SettingError(
            f"{setting}={name}: this machine has {count} {device.type} device(s) that torch can use; "
            f"use {setting}=cpu, or leave {setting} unset to use what is there."
        )
    return device


def linears_outside_pooling(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The `nn.Linear` layers that a precision stores in its own dtype: all but those of the extractors'
    pooling layers, whose multi-head attention reads its projection weights directly (and which run on
    one token per sequence, so they cost little in float32)."""
    pooling = [name for name, m in model.named_modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(name.startswith(f"{p}.") for p in pooling)
    ]


def for_precision(model: torch.nn.Module, precision: str, keep: bool = True) -> torch.nn.Module:
    """`model` as it runs in a concrete `precision`: fp32 the model itself; int8 the copy of
    `quantize_for_cpu`; bf16/fp16 the model with its Linear weights stored in that dtype (a copy if
    `keep`), which autocast uses as they are instead of casting every weight again at every call (the
    same numbers, half the memory); run it under `utils.precision.autocast(precision, device)`."""
    if precision == "int8":
        return quantize_for_cpu(model)
    if precision not in AUTOCAST_DTYPES:
        return model
    low = copy.deepcopy(model) if keep else model
    for linear in linears_outside_pooling(low):
        linear.to(AUTOCAST_DTYPES[precision])
    return low


def quantize_for_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """An int8 copy of `model` (`--precision int8`; float32 stays the default): its `nn.Linear` layers
    (see `linears_outside_pooling`) get int8 weights (per output channel) and dynamically quantised int8
    activations (per token), through torchao's `quantize_` (the successor of the deprecated
    `torch.ao.quantization.quantize_dynamic`). Outputs differ from float32 by quantisation noise, so
    predictions may differ where the top classes are close. CPU only; the float32 `model` is left
    unchanged. See the README for its speed."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(
            "quantize_for_cpu needs a model on the CPU: call it before moving the model, or use another --precision."
        )
    int8 = copy.deepcopy(model)
    chosen = {id(m) for m in linears_outside_pooling(int8)}
    quantize_(int8, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, name: id(m) in chosen)
    return int8.eval()


def set_tf32(allow: bool) -> None:
    """Whether float32 matmuls (cuBLAS) and convolutions (cuDNN) may round their inputs to TF32 (10-bit mantissa)
    on NVIDIA GPUs since Ampere; off: float32 as on the CPU. torch's defaults, since 1.12 and in the original's
    torch 2.0, are matmuls in float32 and convolutions (the patch embeddings) in TF32; the original's stage 1 also
    switched TF32 on for matmuls, its stage 2 and inference kept the defaults. (`fp32_precision` is the API that
    replaces `allow_tf32`; the two must not be mixed in one process.)"""
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if allow else "ieee"
