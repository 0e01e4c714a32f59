"""Triton kernels and their launchers, installed as fusedclip.triton_kernels (the Triton backend's issue)."""
