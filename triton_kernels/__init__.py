"""Triton kernels of pyfusion, one kernel per file. Installed as ``pyfusion.triton_kernels``.

Import these modules only through ``pyfusion.triton_kernels.<name>``, never as a top-level
``triton_kernels`` (that name belongs to Triton's own package). Importing this package does not
import triton; each kernel module does, so set ``TRITON_INTERPRET=1`` before importing one on CPU.
"""
