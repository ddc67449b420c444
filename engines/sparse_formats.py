"""Storage formats for pruned weights, and the bytes each really stores.

Zeroed weights in a dense matrix are still read and multiplied: a dense-format pruned model stores and streams
as many bytes as the reference. Only a format with a kernel that skips the zeros can be faster:

- CSR (``CSRLinear``): values, int32 column indices and row pointers, multiplied by ``torch.sparse.mm`` (MKL's
  sparse BLAS on CPU, cuSPARSE on CUDA). Irregular access: at 50% sparsity it is usually slower than dense.
- 2:4 semi-structured (``to_semi_structured``): two of every four consecutive weights kept, compressed to half
  the values plus 2-bit positions, multiplied on sparse tensor cores (cuSPARSELt, else CUTLASS), CUDA sm_80+ in
  fp16/bf16 only.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

SEMI_STRUCTURED_CAPABILITY = (8, 0)
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


class CSRLinear(nn.Module):
    """A bias-free linear layer whose weight is a CSR matrix: y = x @ W^T, computed as (W @ x^T)^T by
    ``torch.sparse.mm``. Takes and returns the same shapes as the ``nn.Linear`` it replaces."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and the point of measuring it
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
            # int32 indices: half the index bytes, and MKL's kernel takes them without converting (faster)
            csr = torch.sparse_csr_tensor(
                csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape, device=weight.device
            )
        self.register_buffer("weight", csr)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.sparse.mm(self.weight, x.reshape(-1, self.in_features).T)
        return y.T.reshape(*x.shape[:-1], self.out_features)

    def stored_bytes(self) -> int:
        """Values, column indices and row pointers."""
        w = self.weight
        return sum(t.numel() * t.element_size() for t in (w.values(), w.col_indices(), w.crow_indices()))

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def csr_kernel(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.sparse.mm on CSR (cuSPARSE)"
    backend = "MKL sparse BLAS" if torch.backends.mkl.is_available() else "aten's native CSR kernel"
    return f"torch.sparse.mm on CSR ({backend})"


def csr_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch's CSR matmul cannot run this device/dtype (None when it can)."""
    if device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        return (f"engine.format=csr: torch's CPU CSR kernel (MKL) takes fp32 only, not {dtype_name(dtype)}; "
                "run with dtype=fp32")  # fmt: skip
    return None


SEMI_STRUCTURED_HINT = "; engine.format=dense applies the 2:4 mask to dense weights (for its quality cost, without " \
                       "a speedup)"  # fmt: skip


def semi_structured_unavailable(device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None where a 2:4 weight really multiplies on this device, else the reason. Past the capability check
    (sparse tensor cores: sm_80+) a small 2:4 matmul is tried once per device and dtype: CUTLASS's kernels are
    built for sm_8x only, so on a newer GPU whose torch lacks cuSPARSELt the point is skipped, not failed. The
    dtype must also be fp16 or bf16 (``semi_structured_dtype_error``, which ``PrunedEngine.available`` checks)."""
    if device.type != "cuda":
        return f"2:4 semi-structured sparsity needs a CUDA GPU with compute capability 8.0+ (this device: " \
               f"{device.type}){SEMI_STRUCTURED_HINT}"  # fmt: skip
    cap = torch.cuda.get_device_capability(device)
    if cap < SEMI_STRUCTURED_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"2:4 semi-structured sparsity needs a CUDA GPU with compute capability 8.0+ (this device: {name}, "
                f"{cap[0]}.{cap[1]}){SEMI_STRUCTURED_HINT}")  # fmt: skip
    return probe_semi_structured(str(device), dtype if dtype in SEMI_STRUCTURED_DTYPES else torch.float16)


@functools.cache
def probe_semi_structured(device: str, dtype: torch.dtype) -> str | None:
    """Compress a 128x128 2:4 weight and run one ``F.linear`` with it on ``device``: any failure is the reason."""
    try:
        keep = torch.tensor([1, 1, 0, 0], device=device, dtype=dtype).repeat(32)  # two of every four
        sparse = to_semi_structured(torch.randn(128, 128, device=device, dtype=dtype) * keep)
        with torch.inference_mode():
            torch.nn.functional.linear(torch.randn(32, 128, device=device, dtype=dtype), sparse)
    except Exception as exc:  # a missing kernel for this architecture or build is a reason, not a crash
        text = " ".join(str(exc).split())[:200]
        return (f"2:4 semi-structured sparsity cannot run on {device} in {dtype_name(dtype)} here "
                f"({semi_structured_kernel()}): {type(exc).__name__}: {text}{SEMI_STRUCTURED_HINT}")  # fmt: skip
    return None


def semi_structured_dtype_error(dtype: torch.dtype) -> str | None:
    if dtype in SEMI_STRUCTURED_DTYPES:
        return None
    return f"engine.method=2:4 runs on sparse tensor cores in fp16 or bf16 only, not {dtype_name(dtype)}; " \
           "run with dtype=bf16 or dtype=fp16"  # fmt: skip


def _semi_structured_class() -> type:
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return SparseSemiStructuredTensorCUSPARSELT if torch.backends.cusparselt.is_available() else \
        SparseSemiStructuredTensorCUTLASS  # fmt: skip


def semi_structured_kernel() -> str:
    return f"2:4 semi-structured sparse matmul ({_semi_structured_class().BACKEND})"


def semi_structured_shape_error(shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    """None when the kernel takes a weight of this shape, else why not (each backend has minimum tile sizes)."""
    cls = _semi_structured_class()
    limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if limits is None:
        return f"{cls.BACKEND} has no 2:4 kernel for {dtype_name(dtype)}"
    rows, cols = shape
    r, c = limits.sparse_min_rows, limits.sparse_min_cols
    if rows < r or rows % r or cols < c or cols % c:
        return f"{cls.BACKEND} needs weight dimensions that are multiples of ({r}, {c}); this one is {rows}x{cols}"
    return None


def to_semi_structured(weight: Tensor) -> Tensor:
    """A weight already masked to 2:4, compressed for the sparse tensor cores. ``F.linear`` (so ``nn.Linear``)
    dispatches to the sparse kernel when this is its weight."""
    return _semi_structured_class().from_dense(weight.detach().contiguous())


def is_semi_structured(t: Tensor) -> bool:
    try:
        from torch.sparse import SparseSemiStructuredTensor
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return isinstance(t, SparseSemiStructuredTensor)


def semi_structured_bytes(rows: int, cols: int, itemsize: int) -> int:
    """Compressed 2:4 storage: half the values, plus a 2-bit position for each kept value (cols/8 bytes a row)."""
    return rows * cols // 2 * itemsize + rows * cols // 8


def stored_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights ``model`` stores in its formats: CSR and 2:4 layers by their compressed storage, every
    other parameter (dense, masked or not) at its dtype; a tied weight counts once."""
    total, seen = 0, set()
    for mod in model.modules():
        if isinstance(mod, CSRLinear):
            total += mod.stored_bytes()
            continue
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if is_semi_structured(p):
                total += semi_structured_bytes(p.shape[0], p.shape[1], p.element_size())
            else:
                total += p.numel() * p.element_size()
    return total
