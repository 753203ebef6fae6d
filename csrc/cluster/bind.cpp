// pybind11 bindings of the cluster engine: weighted k-means with randomized-Ward starts (kmeans.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <string>
#include <vector>

#include "cluster/kmeans.h"
#include "common.h"

namespace py = pybind11;
using pyfusion::cluster::KMeansOptions;

namespace {

using Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

// data: features (D, F) when is_gram is false, else a symmetric Gram matrix (D, D); weights (D,).
// Returns (labels int64 (D,), inertia, best_restart, restart_inertia float64 (n_restarts,)).
py::tuple weighted_kmeans(const Array& data, bool is_gram, const Array& weights, int64_t num_clusters,
                          int64_t n_restarts, const std::string& init, int64_t top_k, int64_t max_iter,
                          const std::string& refine, uint64_t seed, int num_threads) {
  PF_CHECK(data.ndim() == 2, "weighted_kmeans: ", is_gram ? "gram" : "points", " must be 2-D; got ", data.ndim(),
           "-D");
  const int64_t d = data.shape(0), f = data.shape(1);
  PF_CHECK(!is_gram || f == d, "weighted_kmeans: gram must be square (D, D); got (", d, ", ", f, ")");
  PF_CHECK(weights.ndim() == 1 && weights.shape(0) == d, "weighted_kmeans: weights must have shape (", d,
           ",); got ndim ", weights.ndim(), " and ", weights.ndim() ? weights.shape(0) : 0, " entries");
  PF_CHECK(init == "ward" || init == "kmeans++", "weighted_kmeans: init must be 'ward' or 'kmeans++'; got '", init,
           "'");
  PF_CHECK(refine == "lloyd" || refine == "hartigan",
           "weighted_kmeans: refine must be 'lloyd' or 'hartigan'; got '", refine, "'");
  KMeansOptions opt;
  opt.num_clusters = num_clusters;
  opt.n_restarts = n_restarts;
  opt.init = init == "ward" ? pyfusion::cluster::Init::Ward : pyfusion::cluster::Init::KMeansPP;
  opt.top_k = top_k;
  opt.max_iter = max_iter;
  opt.refine = refine == "lloyd" ? pyfusion::cluster::Refine::Lloyd : pyfusion::cluster::Refine::Hartigan;
  opt.seed = seed;
  opt.num_threads = num_threads;
  const double* x = data.data();
  const double* w = weights.data();
  pyfusion::cluster::KMeansResult res;
  {
    py::gil_scoped_release release;
    for (int64_t q = 0; q < d * f; ++q) {
      PF_CHECK(std::isfinite(x[q]), "weighted_kmeans: ", is_gram ? "gram" : "points", " contain NaN or inf");
    }
    for (int64_t i = 0; i < d; ++i) {
      PF_CHECK(std::isfinite(w[i]) && w[i] > 0.0, "weighted_kmeans: weights must be finite and > 0; weights[", i,
               "] = ", w[i]);
    }
    std::vector<double> g = is_gram ? pyfusion::cluster::centered_gram(x, d, w)
                                    : pyfusion::cluster::centered_gram_from_features(x, d, f, w, num_threads);
    res = pyfusion::cluster::weighted_kmeans_gram(g, d, w, opt);
  }
  py::array_t<int64_t> labels(d);
  std::copy(res.labels.begin(), res.labels.end(), labels.mutable_data());
  py::array_t<double> rin(static_cast<py::ssize_t>(res.restart_inertia.size()));
  std::copy(res.restart_inertia.begin(), res.restart_inertia.end(), rin.mutable_data());
  return py::make_tuple(labels, res.inertia, res.best_restart, rin);
}

}  // namespace

void bind_cluster(py::module_& m) {
  m.def("weighted_kmeans", &weighted_kmeans, py::arg("data"), py::arg("is_gram"), py::arg("weights"),
        py::arg("num_clusters"), py::arg("n_restarts"), py::arg("init"), py::arg("top_k"), py::arg("max_iter"),
        py::arg("refine"), py::arg("seed"), py::arg("num_threads"),
        "Weighted k-means (kernel form) refined from randomized-Ward or k-means++ starts; best of n_restarts. "
        "data: points (D, F) or a Gram matrix (D, D) when is_gram. Returns (labels, inertia, best_restart, "
        "restart_inertia).");
}
