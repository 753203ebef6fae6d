// pybind11 bindings of the cluster engine (filled in by the cluster work).
#include <pybind11/pybind11.h>

namespace py = pybind11;

void bind_cluster(py::module_& m) { (void)m; }
