"""``QuantLinear``: a linear layer whose weight is a packed ``QuantizedTensor``.

State dict (``N = out_features``, ``K = in_features``, ``G`` scale groups):

* ``qweight``: uint8 ``[N, packed_row_bytes(K, bits)]`` (layout ``lowbit.bitstream.v1``)
* ``scale``: scale dtype ``[N, G]`` (``[1, 1]`` per tensor)
* ``zero``: uint8 ``[N, G]`` (affine schemes only; the scale dtype for ``zero_point='float'``)
* double-quantized scales (``double_quant``): ``scale`` uint8 codes, ``scale_absmax``,
  ``scale_offset``; LLM.int8 outliers: ``outlier_idx``, ``outlier_weight``
  (all shapes in ``lowbit.tensor.stored_tensor_specs``)
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

from lowbit.kernels import registry
from lowbit.scheme import QuantScheme
from lowbit.tensor import QuantizedTensor, stored_tensor_specs

# stored tensors that only some schemes have (None otherwise); qweight and scale always exist
_OPTIONAL = ("zero", "scale_absmax", "scale_offset", "outlier_idx", "outlier_weight")
_KEY_BUFFERS = ("qweight", "scale", *_OPTIONAL)


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
        n_outliers: int = 0,
    ) -> None:
        super().__init__()
        scheme.check_layer("QuantLinear", in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.kernel = kernel
        specs = stored_tensor_specs(scheme, out_features, in_features, n_outliers)
        for name in _OPTIONAL:
            if name not in specs:
                setattr(self, name, None)
        for name, (shape, dtype) in specs.items():
            fill = torch.ones if name == "scale" and dtype.is_floating_point else torch.zeros
            self.register_buffer(name, fill(shape, dtype=dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._prepared: dict[str, tuple[tuple, Any]] = {}
        # ((requested kernel name, tensor key), Kernel) of the last call: resolving afresh
        # (every registered kernel's supports()) cost ~10 us a call, 2-4 ms a decoded token
        self._resolved: Optional[tuple[tuple, registry.Kernel]] = None

    @classmethod
    def from_quantized(
        cls, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None, *, kernel: str = "auto"
    ) -> "QuantLinear":
        n, k = qt.shape
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(k, n, qt.scheme, bias=bias is not None, dtype=dtype, kernel=kernel, n_outliers=qt.n_outliers)
        for name, t in qt.tensors().items():
            setattr(layer, name, t.contiguous())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def quantized_tensor(self) -> QuantizedTensor:
        return QuantizedTensor(
            self.qweight, self.scale, self.zero, (self.out_features, self.in_features), self.scheme,
            scale_absmax=self.scale_absmax, scale_offset=self.scale_offset,
            outlier_idx=self.outlier_idx, outlier_weight=self.outlier_weight,
        )

    @property
    def n_outliers(self) -> int:
        return 0 if self.outlier_idx is None else int(self.outlier_idx.numel())

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_tensor().dequantize(dtype)

    @property
    def kernel_name(self) -> str:
        """The kernel the next forward call would use."""
        return registry.resolve(self, self.kernel).name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = self._tensor_key()
        k = self._resolve(key)
        return k.run(self, self._prepared_state(k, key), x)

    def _tensor_key(self) -> tuple:
        # data_ptr catches replaced tensors, _version catches in-place writes (load_state_dict);
        # read the module's dicts directly: nn.Module.__getattr__ costs ~1 us a name
        buffers = self._buffers
        return (
            _identity(self._parameters.get("bias")),
            *(_identity(buffers.get(n)) for n in _KEY_BUFFERS),
        )

    def _resolve(self, key: tuple) -> registry.Kernel:
        """``registry.resolve``, reused while the requested name (``use_kernel`` override or
        ``self.kernel``) and the layer's tensors stay the same."""
        wanted = (registry.active_kernel_override() or self.kernel, key)
        if self._resolved is not None and self._resolved[0] == wanted:
            return self._resolved[1]
        k = registry.resolve(self, self.kernel)
        self._resolved = (wanted, k)
        return k

    def _prepared_state(self, k: registry.Kernel, key: Optional[tuple] = None) -> Any:
        key = self._tensor_key() if key is None else key
        hit = self._prepared.get(k.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        state = k.prepare(self)
        self._prepared[k.name] = (key, state)
        return state

    def release_prepared(self) -> None:
        """Drop kernel-specific weight copies (they are rebuilt on demand)."""
        self._prepared.clear()
        self._resolved = None

    @property
    def nbytes(self) -> int:
        return self.quantized_tensor().nbytes

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scheme={self.scheme.short_name}, bias={self.bias is not None}, kernel={self.kernel}"
        )
