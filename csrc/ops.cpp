// Registers the compiled kernels as the CPU and CUDA implementations of the ops `fastbert::exit_head`,
// `fastbert::compact_plan` and `fastbert::compact_gather`, whose schemas are defined once, in
// fastbert_kernels/ops/library.py (imported before this extension). A call on CPU tensors then goes
// from the dispatcher straight to C++, in eager and compiled code alike. The dispatcher infers
// each function's schema from its C++ signature and checks it against the defined one, so the two
// cannot drift without the import failing.
#include <Python.h>
#include <torch/library.h>

#include "fastbert/exit_rule.h"
#include "fastbert/kernels.h"

namespace fastbert {

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("exit_head", &exit_head_cpu);
  m.impl("compact_plan", &compact_plan_cpu);
  m.impl("compact_gather", &compact_gather_cpu);
}

#ifdef FASTBERT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("exit_head", &exit_head_cuda);
  m.impl("compact_plan", &compact_plan_cuda);
  m.impl("compact_gather", &compact_gather_cuda);
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
  // folded_weights: the order the kernels unpack `weights` in (checked against Python by a test).
  // exit_criteria: the criterion names the kernels accept, in FASTBERT_EXIT_CRITERIA's order.
  return Py_BuildValue("{s:O,s:O,s:s,s:s,s:s}", "openmp", openmp ? Py_True : Py_False, "cuda",
                       cuda ? Py_True : Py_False, "cuda_archs", cuda_archs, "folded_weights",
                       fastbert::kFoldedWeightNames, "exit_criteria", fastbert::kExitCriterionNames);
}

static PyMethodDef methods[] = {{"build_info", build_info, METH_NOARGS, "What this build contains."},
                                {nullptr, nullptr, 0, nullptr}};
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastbert_kernels compiled ops", -1, methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
