// The Python module entry of the AOT build, so that `import ema_fused._C` loads the
// shared library (which registers the kernel ops with the dispatcher as it loads).
// The module itself is empty: everything is reached through torch.ops.ema_fused.
// (JIT builds are loaded with torch.ops.load_library and do not need it.)
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "ema_fused's C++/CUDA kernel ops", -1, nullptr};
  return PyModule_Create(&module_def);
}
