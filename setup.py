"""Build: the `fusedclip` package lives in python/fusedclip, the Triton kernels in triton_kernels/ (installed as
fusedclip.triton_kernels). The optional CUDA extension (fusedclip._C) is added by csrc/ when it is built."""

from setuptools import setup

setup(
    packages=["fusedclip", "fusedclip.backends", "fusedclip.triton_kernels"],
    package_dir={
        "fusedclip": "python/fusedclip",
        "fusedclip.triton_kernels": "triton_kernels",
    },
)
