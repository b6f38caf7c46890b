// The craft op schemas. Kernels register per device in csrc/cpu and csrc/cuda; fake kernels and
// autograd live in craft_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(craft, m) {
  m.def("grad_stats(Tensor a, Tensor b) -> Tensor");
  m.def("grad_stats_pieces(Tensor[] a, Tensor[] b) -> Tensor");
  m.def("grad_combine_(Tensor(a!) a, Tensor b, Tensor coef) -> ()");
  m.def("hidden_mse(Tensor student, Tensor teacher, Tensor? mask) -> Tensor");
  m.def("hidden_mse_backward(Tensor grad, Tensor student, Tensor teacher, Tensor? mask) -> Tensor");
}
