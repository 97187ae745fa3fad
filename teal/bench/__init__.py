"""GPU benchmarks: sparse GEMV kernels (``teal.bench.kernels``) and decoding (``teal.bench.decode``)."""
