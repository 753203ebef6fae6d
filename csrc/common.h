// Shared helpers for the torch-free C++ core: error reporting and thread control.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace pyfusion {

// Errors raised by the core carry a full sentence; pybind11 maps std::invalid_argument to
// ValueError, so Python callers see the same message the C++ check printed.
template <typename... Args>
[[noreturn]] inline void fail(const Args&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

#define PF_CHECK(cond, ...)              \
  do {                                   \
    if (!(cond)) ::pyfusion::fail(__VA_ARGS__); \
  } while (0)

// Number of OpenMP threads to use for `requested` (<= 0: the runtime default).
inline int resolve_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

}  // namespace pyfusion
