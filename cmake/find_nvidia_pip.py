"""Print where torch's CUDA pip dependencies are, for CMakeLists.txt (run by the build's Python).

Line 1: comma-separated `nvidia/<pkg>/include` folders (torch's CUDA headers include cuBLAS and
cuSPARSE headers from them). Line 2: the folder holding the CUDA runtime of torch's CUDA major
version, relative to the installed `craft_ext` package folder (for the module's rpath), or empty.
Nothing is assumed about the layout (CUDA 12 wheels use nvidia/<library>/, CUDA 13 nvidia/cu13/).
"""

import importlib.util
import os

import torch

site_packages = os.path.dirname(os.path.dirname(torch.__file__))
spec = importlib.util.find_spec("nvidia")
roots = list(spec.submodule_search_locations) if spec is not None else []
includes, runtime = [], ""
major = (torch.version.cuda or "").split(".")[0]
for root in roots:
    for pkg in sorted(os.listdir(root)):
        include, lib = os.path.join(root, pkg, "include"), os.path.join(root, pkg, "lib")
        if os.path.isdir(include):
            includes.append(include)
        if major and not runtime and os.path.exists(os.path.join(lib, f"libcudart.so.{major}")):
            runtime = os.path.relpath(lib, os.path.join(site_packages, "craft_ext"))
print(",".join(includes))
print(runtime)
