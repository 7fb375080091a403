"""memlm.kernels: fused memory attention (a pure-torch reference and Triton kernels).

Empty until the runtime issue lands ``memory_attention``; it never imports ``memlm.index``.
"""
