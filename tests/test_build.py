"""The build itself: build_info, and a loud failure if a CUDA build was silently dropped."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import craft_ext


def test_build_info_reports_the_torch_it_was_built_against():
    info = craft_ext.build_info()
    assert {"torch", "cuda", "cuda_arch", "cuda_version"} <= info.keys()
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda"], bool)


def test_build_info_is_consistent_about_cuda():
    """CUDA kernels come with their archs and nvcc version, and only from a CUDA build of torch; a CPU
    build reports neither."""
    info = craft_ext.build_info()
    if info["cuda"]:
        assert torch.version.cuda is not None
        assert info["cuda_arch"] and all(a.strip().rstrip("a").isdigit() for a in info["cuda_arch"].split(";"))
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
    else:
        assert info["cuda_arch"] == "" and info["cuda_version"] == ""


def test_cuda_kernels_were_compiled_when_nvcc_is_present():
    """CI has nvcc: if the CUDA kernels were dropped (a broken toolchain lookup), fail loudly."""
    if os.environ.get("CRAFT_EXT_CUDA") == "0":
        pytest.skip("CRAFT_EXT_CUDA=0: CUDA kernels deliberately off")
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH: nothing to compile CUDA kernels with")
    if torch.version.cuda is None:
        pytest.skip("torch is a CPU-only build: CUDA kernels are skipped by design")
    assert craft_ext.build_info()["cuda"], "nvcc is on PATH but craft_ext._C was built without CUDA kernels"


def test_all_ops_have_a_kernel_for_each_compiled_device():
    names = ["grad_stats", "grad_combine_", "hidden_mse", "hidden_mse_backward"]
    keys = ["CPU"] + (["CUDA"] if craft_ext.build_info()["cuda"] else [])
    for name in names:
        for key in keys:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"craft::{name}", key), (name, key)
