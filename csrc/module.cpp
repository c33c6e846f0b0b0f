// Makes the shared library importable as `bnext._C`. Importing it runs the
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL static initialisers; every op goes
// through the dispatcher. The functions bound here serve the choice of CPU
// kernels at import (bnext/_cpu_capability.py), before any op runs, and
// give Python the activation table (bnext/_ops/activations.py).
#include <Python.h>
#include <c10/util/Exception.h>

#include <exception>
#include <string>

#include "activation_kind.h"
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

PyObject* set_cpu_forced_choice(PyObject* /*self*/, PyObject* args) {
  int which = 0, value = 0;
  if (!PyArg_ParseTuple(args, "ii", &which, &value)) {
    return nullptr;
  }
  try {
    return PyLong_FromLong(bnext::cpu::set_cpu_forced_choice(which, value));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  }
  return nullptr;
}

PyObject* activation_names(PyObject* /*self*/, PyObject* /*unused*/) {
  PyObject* names = PyTuple_New(static_cast<Py_ssize_t>(std::size(bnext::kActivationNames)));
  if (names == nullptr) {
    return nullptr;
  }
  for (size_t i = 0; i < std::size(bnext::kActivationNames); ++i) {
    const std::string_view name = bnext::kActivationNames[i];
    PyObject* item = PyUnicode_FromStringAndSize(name.data(), static_cast<Py_ssize_t>(name.size()));
    if (item == nullptr) {
      Py_DECREF(names);
      return nullptr;
    }
    PyTuple_SET_ITEM(names, static_cast<Py_ssize_t>(i), item);
  }
  return names;
}

PyObject* activation_invertible(PyObject* /*self*/, PyObject* args) {
  const char* name = nullptr;
  double negative_slope = 0.0;
  if (!PyArg_ParseTuple(args, "sd", &name, &negative_slope)) {
    return nullptr;
  }
  try {
    return PyBool_FromLong(
        bnext::act_invertible(bnext::parse_activation(name), negative_slope) ? 1 : 0);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  }
  return nullptr;
}

PyMethodDef methods[] = {
    {"_load_cpu_kernels", load_cpu_kernels, METH_O,
     "Route bnext's CPU ops through the level library at this path; returns its level."},
    {"_cpu_has_avx512_bf16", cpu_has_avx512_bf16, METH_NOARGS,
     "Whether this CPU has AVX512_BF16 (CPUID)."},
    {"_set_cpu_forced_choice", set_cpu_forced_choice, METH_VARARGS,
     "Force a CPU memory-traffic choice (which, value: -1 auto, 0 off, 1 on); returns the previous."},
    {"_activation_names", activation_names, METH_NOARGS,
     "The fused ops' activation names, in csrc/activation_kind.h's order."},
    {"_activation_invertible", activation_invertible, METH_VARARGS,
     "Whether an activation's input can be recovered from its output (name, negative_slope)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "bnext operator library", -1, methods};
  return PyModule_Create(&module_def);
}
