// The craft_ext._C Python module. Loading it registers the torch.ops.craft kernels (static
// initialisers in csrc/); the module itself only reports how it was built.
#include <pybind11/pybind11.h>

#include "craft_build_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "craft_ext compiled kernels (torch.ops.craft) and build information";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["torch"] = CRAFT_TORCH_VERSION;
        info["cuda"] = static_cast<bool>(CRAFT_WITH_CUDA);
        info["cuda_arch"] = CRAFT_CUDA_ARCH;
        info["cuda_version"] = CRAFT_CUDA_VERSION;
        info["compiler"] = CRAFT_CXX_COMPILER;
        return info;
      },
      "How the extension was built: torch version, CUDA kernels compiled in, CUDA archs.");
}
