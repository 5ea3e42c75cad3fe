"""``QuantLinear``: a linear layer whose weight is a packed ``QuantizedTensor``.

State dict (``N = out_features``, ``K = in_features``, ``G`` scale groups):

* ``qweight``: uint8 ``[N, packed_row_bytes(K, bits)]`` (layout ``lowbit.bitstream.v1``)
* ``scale``: scale dtype ``[N, G]`` (``[1, 1]`` per tensor)
* ``zero``: uint8 ``[N, G]`` (affine schemes only; the scale dtype for ``zero_point='float'``)
* ``bias``: ``[N]`` in the model's dtype (when the source layer had one)

It computes ``y = x W^T + b`` like ``nn.Linear``; a GPT-2 ``Conv1D`` (weight
stored ``[in, out]``) is transposed at quantization time and becomes an
ordinary ``QuantLinear``. The kernel is chosen per call (see
``lowbit.kernels.registry``); fast kernels prepare their own weight layout on
first use and cache it on the layer (not saved in the state dict).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lowbit import packing
from lowbit.kernels import registry
from lowbit.scheme import Granularity, QuantScheme
from lowbit.tensor import QuantizedTensor
from lowbit.formats import scale_torch_dtype, zero_torch_dtype


def _identity(t: Optional[torch.Tensor]):
    if t is None:
        return None
    try:
        return (t.data_ptr(), t._version)
    except RuntimeError:  # inference tensors carry no version counter (and cannot be written in place)
        return (t.data_ptr(), None)


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        bias: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        scheme.check_layer("QuantLinear", in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.kernel = kernel
        if scheme.granularity is Granularity.TENSOR:
            qshape = (1, 1)
        else:
            qshape = (out_features, scheme.n_groups(in_features))
        row_bytes = packing.packed_row_bytes(in_features, scheme.bits)
        self.register_buffer("qweight", torch.zeros(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(qshape, dtype=scale_torch_dtype(scheme), device=device))
        if scheme.symmetric:
            self.zero = None
        else:
            self.register_buffer("zero", torch.zeros(qshape, dtype=zero_torch_dtype(scheme), device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._prepared: dict[str, tuple[tuple, Any]] = {}

    @classmethod
    def from_quantized(
        cls, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None, *, kernel: str = "auto"
    ) -> "QuantLinear":
        n, k = qt.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(k, n, qt.scheme, bias=bias is not None, dtype=dtype, kernel=kernel)
        layer.qweight = qt.packed.contiguous()
        layer.scale = qt.scale.contiguous()
        if qt.zero is not None:
            layer.zero = qt.zero.contiguous()
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def quantized_tensor(self) -> QuantizedTensor:
        return QuantizedTensor(self.qweight, self.scale, self.zero, (self.out_features, self.in_features), self.scheme)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_tensor().dequantize(dtype)

    @property
    def kernel_name(self) -> str:
        """The kernel the next forward call would use."""
        return registry.resolve(self, self.kernel).name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = registry.resolve(self, self.kernel)
        return k.run(self, self._prepared_state(k), x)

    def _prepared_state(self, k: registry.Kernel) -> Any:
        # data_ptr catches replaced tensors, _version catches in-place writes (load_state_dict)
        key = tuple(_identity(t) for t in (self.qweight, self.scale, self.zero, self.bias))
        hit = self._prepared.get(k.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        state = k.prepare(self)
        self._prepared[k.name] = (key, state)
        return state

    def release_prepared(self) -> None:
        """Drop kernel-specific weight copies (they are rebuilt on demand)."""
        self._prepared.clear()

    @property
    def nbytes(self) -> int:
        return self.quantized_tensor().nbytes

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.scheme.short_name}, bias={self.bias is not None}, kernel={self.kernel}"
        )
