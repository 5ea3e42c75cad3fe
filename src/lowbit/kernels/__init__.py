"""Matmul kernels for quantized linear layers.

Every fast kernel (``cpu_int4``, ``cpu_int8``) is a set of pure functions with
the reference kernel (``reference``: dequantize, then ``F.linear``) as its
twin; ``tests/test_kernels_cpu.py`` pins each pair together.
"""
