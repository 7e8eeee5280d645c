// Registers the compiled kernels as torch ops in the `fastbert_C` namespace. The public ops
// (`fastbert::exit_head`, `fastbert::compact`, defined in fastbert_kernels/ops/custom_ops.py) take
// the paper's weights and route to these through the package's single dispatch point.
#include <Python.h>
#include <torch/library.h>

#include "fastbert/kernels.h"

namespace fastbert {
namespace {

template <auto Kernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_entry(
    const at::Tensor& hidden, const at::Tensor& mask, const at::Tensor& w_in, const at::Tensor& b_in,
    const at::Tensor& w_qk, const at::Tensor& b_qk, const at::Tensor& w_ov, const at::Tensor& b_ov,
    const at::Tensor& w_pool, const at::Tensor& b_pool, const at::Tensor& w_cls, const at::Tensor& b_cls,
    int64_t num_heads, double speed) {
  return Kernel(hidden, mask, FoldedWeights{w_in, b_in, w_qk, b_qk, w_ov, b_ov, w_pool, b_pool, w_cls, b_cls},
                num_heads, speed);
}

}  // namespace

TORCH_LIBRARY(fastbert_C, m) {
  m.def(
      "exit_head_folded(Tensor hidden, Tensor mask, Tensor w_in, Tensor b_in, Tensor w_qk, Tensor b_qk, "
      "Tensor w_ov, Tensor b_ov, Tensor w_pool, Tensor b_pool, Tensor w_cls, Tensor b_cls, int num_heads, "
      "float speed) -> (Tensor logits, Tensor uncertainty, Tensor exits)");
  m.def(
      "compact(Tensor hidden, Tensor mask, Tensor rows, Tensor keep, bool trim) -> (Tensor hidden, Tensor mask, "
      "Tensor rows, bool padded)");
}

TORCH_LIBRARY_IMPL(fastbert_C, CPU, m) {
  m.impl("exit_head_folded", &exit_head_entry<exit_head_cpu>);
  m.impl("compact", &compact_cpu);
}

#ifdef FASTBERT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastbert_C, CUDA, m) {
  m.impl("exit_head_folded", &exit_head_entry<exit_head_cuda>);
  m.impl("compact", &compact_cuda);
}
#endif

}  // namespace fastbert

// What was compiled in, for the environment report.
static PyObject* build_info(PyObject*, PyObject*) {
#ifdef _OPENMP
  const int openmp = 1;
#else
  const int openmp = 0;
#endif
#ifdef FASTBERT_WITH_CUDA
  const int cuda = 1;
  // Compute capabilities with machine code; the last also has PTX (setup.py).
  const char* cuda_archs = FASTBERT_CUDA_ARCHS;
#else
  const int cuda = 0;
  const char* cuda_archs = "";
#endif
  return Py_BuildValue("{s:O,s:O,s:s}", "openmp", openmp ? Py_True : Py_False, "cuda", cuda ? Py_True : Py_False,
                       "cuda_archs", cuda_archs);
}

static PyMethodDef methods[] = {{"build_info", build_info, METH_NOARGS, "What this build contains."},
                                {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastbert_kernels compiled ops", -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
