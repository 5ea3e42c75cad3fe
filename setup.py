"""Build of lowbit's one compiled piece; all metadata lives in pyproject.toml.

``lowbit.kernels._lut_cpu`` holds lowbit's CPU kernels (``src/lowbit/kernels/csrc/``:
the LUT kernel ``lut_linear.c``, the FP8 kernel ``fp8_linear.c`` and their thread
pool ``pool.c``): plain C, no Python or torch headers, loaded with ctypes by
``lowbit.kernels.clib`` for ``cpu_lut`` and ``cpu_fp8``. It is optional:
without a C compiler the install still succeeds and the kernel registry reports
``cpu_lut`` and ``cpu_fp8`` as unsupported (layers fall back to the reference kernel).
``pip install -e .`` builds it in place, next to cpu_lut.py; after editing the
C sources, run it again (or ``python setup.py build_ext --inplace``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lowbit.kernels._lut_cpu",
            sources=[
                "src/lowbit/kernels/csrc/lut_linear.c",
                "src/lowbit/kernels/csrc/fp8_linear.c",
                "src/lowbit/kernels/csrc/pool.c",
            ],
            depends=["src/lowbit/kernels/csrc/pool.h"],
            extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-Wall", "-Wno-psabi"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ],
)
