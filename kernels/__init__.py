"""Triton kernels of lrfree, installed as ``lrfree.kernels``.

The multi-tensor launch layer and the per-method fused kernels live here; the plain-PyTorch
reference they are tested against is in ``lrfree.methods`` / ``lrfree.backends.torch_ref``.
"""
