"""The build itself: build_info, and a loud failure if a CUDA build was silently dropped."""

from __future__ import annotations

import os
import shutil

import torch

import craft_ext


def test_build_info_reports_the_torch_it_was_built_against():
    info = craft_ext.build_info()
    assert {"torch", "cuda", "cuda_arch"} <= info.keys()
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_arch"]  # e.g. "80;90"


def test_cuda_kernels_were_compiled_when_nvcc_is_present():
    """CI has nvcc: if the CUDA kernels were dropped (a broken toolchain lookup), fail loudly."""
    if os.environ.get("CRAFT_EXT_CUDA") == "0" or shutil.which("nvcc") is None or torch.version.cuda is None:
        return  # CUDA deliberately off, or nothing to compile with: no claim to check
    assert craft_ext.build_info()["cuda"], "nvcc is on PATH but craft_ext._C was built without CUDA kernels"


def test_all_ops_have_a_kernel_for_each_compiled_device():
    names = ["grad_stats", "grad_combine_", "hidden_mse", "hidden_mse_backward"]
    keys = ["CPU"] + (["CUDA"] if craft_ext.build_info()["cuda"] else [])
    for name in names:
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"craft::{name}", key), (name, key)
