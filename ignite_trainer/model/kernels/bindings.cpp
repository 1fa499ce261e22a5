// The Python module of the CPU kernels (built by ignite_trainer.cpu_kernels).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("batch_stats", &batch_stats, "per-channel mean and biased variance, [2, C] float64");
  m.def("forward", &forward, "maxpool(gelu(y * scale + shift)) and the argmax index");
  m.def("backward_pooled", &backward_pooled, "gradient at each argmax and its per-channel sums");
  m.def("backward_input", &backward_input, "dense input gradient");
}
