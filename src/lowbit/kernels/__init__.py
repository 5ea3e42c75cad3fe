"""Matmul kernels for quantized linear layers.

Every fast kernel (``cpu_int4``, ``cpu_int8``, ``cpu_w8a8``) is a set of pure
functions with the reference kernel (``reference``: dequantize, then
``F.linear``; W8A8 schemes fake-quantize the activations first) as its twin;
``tests/test_kernels_cpu.py`` and ``tests/test_kernels_w8a8.py`` pin each pair together.
"""
