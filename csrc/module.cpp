// Makes the shared library importable as `bnext._C`. Importing it runs the
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL static initialisers; no Python functions
// are bound here because every entry point goes through the dispatcher.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "bnext operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}
