// pybind11 bindings of the correlation engine (filled in by the correlation work).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_correlation(py::module_& m) { (void)m; }
