// Makes the shared library importable as `bnext._C`. Importing it runs the
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL static initialisers; every op goes
// through the dispatcher. The two functions bound here serve the choice of
// CPU kernels at import (bnext/_cpu_capability.py), before any op runs.
#include <Python.h>
#include <c10/util/Exception.h>

#include <exception>
#include <string>

#include "cpu_dispatch.h"

namespace {

PyObject* load_cpu_kernels(PyObject* /*self*/, PyObject* path) {
  const char* utf8 = PyUnicode_AsUTF8(path);
  if (utf8 == nullptr) {
    return nullptr;
  }
  try {
    return PyUnicode_FromString(bnext::cpu::load_cpu_op_table(utf8).c_str());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ImportError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
  }
  return nullptr;
}

PyObject* cpu_has_avx512_bf16(PyObject* /*self*/, PyObject* /*unused*/) {
  return PyBool_FromLong(bnext::cpu::cpu_has_avx512_bf16() ? 1 : 0);
}

PyMethodDef methods[] = {
    {"_load_cpu_kernels", load_cpu_kernels, METH_O,
     "Route bnext's CPU ops through the level library at this path; returns its level."},
    {"_cpu_has_avx512_bf16", cpu_has_avx512_bf16, METH_NOARGS,
     "Whether this CPU has AVX512_BF16 (CPUID)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "bnext operator library", -1, methods};
  return PyModule_Create(&module_def);
}
