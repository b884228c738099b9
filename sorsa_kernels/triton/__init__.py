"""Triton kernels (the ``triton`` backend). Each module implements one op's backend interface,
as documented in the matching module of :mod:`sorsa_kernels.reference`."""
