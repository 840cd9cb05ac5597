// retake_ops._C: a Python module with no functions of its own. Importing it
// runs the static TORCH_LIBRARY_IMPL registrations of the kernels linked in.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
