"""NF4 quantization (bitsandbytes-compatible) and the transformers+bitsandbytes 4-bit checkpoint format."""

from lorafuse.quant.bnb_format import is_bnb_4bit_checkpoint, read_bnb_4bit_state, write_bnb_4bit_folder
from lorafuse.quant.nf4 import (
    DYNAMIC_MAP_SIGNED,
    NF4_CODE,
    NF4Weight,
    dequantize_nf4,
    double_quantize,
    quantize_nf4,
)

__all__ = [
    "DYNAMIC_MAP_SIGNED",
    "NF4_CODE",
    "NF4Weight",
    "dequantize_nf4",
    "double_quantize",
    "is_bnb_4bit_checkpoint",
    "quantize_nf4",
    "read_bnb_4bit_state",
    "write_bnb_4bit_folder",
]
