// retake_ops._C: importing it runs the static TORCH_LIBRARY_IMPL registrations of the kernels
// linked in. Its two functions tell build_info() which instruction set the CPU kernels use.
#include <Python.h>

#include <c10/util/Exception.h>

#include "cpu/cpu_isa.h"

namespace {

// The set a CPU kernel call would use now (RETAKE_OPS_CPU_ISA or the best supported one).
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(retake::cpu_isa().name);
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  }
  return nullptr;
}

// The compiled sets this processor supports, baseline first.
PyObject* cpu_isas(PyObject*, PyObject*) {
  const auto names = retake::supported_cpu_isas();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(names.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < names.size(); ++i) {
    PyObject* name = PyUnicode_FromString(names[i].c_str());
    if (name == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), name);
  }
  return list;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use now."},
    {"cpu_isas", cpu_isas, METH_NOARGS, "The instruction sets compiled in that this processor supports."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
