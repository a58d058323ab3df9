"""The one dtype table: safetensors code <-> torch dtype name, and which of them a recipe may ask for.

Torch-free on purpose (the recipe schema reads it, and ``mergelab --help`` must stay quick); ``torch_dtype``
turns a name into the torch object where torch is loaded anyway.
"""

from __future__ import annotations

from typing import Any

# safetensors header code -> torch dtype name; the first four are the floating-point dtypes a merge can write
SAFETENSORS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
               "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # what recipes' dtype / out_dtype may name
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a table name ('bfloat16' -> torch.bfloat16)."""
    import torch

    return getattr(torch, name)


def dtype_name(dtype: Any) -> str:
    """The table name of a torch dtype (torch.bfloat16 -> 'bfloat16')."""
    name = str(dtype).removeprefix("torch.")
    if name not in SAFETENSORS.values():
        raise ValueError(f"dtype {dtype} is not in the safetensors table")
    return name


def safetensors_code(dtype: Any) -> str:
    """The safetensors header code of a torch dtype (torch.bfloat16 -> 'BF16')."""
    name = dtype_name(dtype)
    return next(code for code, value in SAFETENSORS.items() if value == name)
