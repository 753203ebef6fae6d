// Host side of the batched assignment core (lsap_batch.h): the CPU emulation of a team (tests the GPU algorithm on
// a machine without a GPU) and the error messages shared with the CUDA path.
#include "assignment/lsap_batch.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <stdexcept>

#include "common.h"

namespace pyfusion {
namespace lsap_batch {

std::string status_message(const Status& st, const std::string& name, int64_t m, bool maximize, int64_t num_matches) {
  if (st.code == kNaN || st.code == kBadInf) {
    const int64_t i = m > 0 ? st.where / m : 0, j = m > 0 ? st.where % m : 0;
    std::ostringstream at;
    at << " at (" << i << ", " << j << "); ";
    if (st.code == kNaN) return name + " contains NaN" + at.str() + "costs must be numbers (+inf marks a forbidden pair)";
    if (maximize)
      return name + " contains +inf" + at.str() + "when maximising only -inf (a forbidden pair) is allowed";
    return name + " contains -inf" + at.str() + "when minimising only +inf (a forbidden pair) is allowed";
  }
  if (st.code == kInfeasible) {
    const std::string what = num_matches >= 0
                                 ? "no assignment of num_matches=" + std::to_string(num_matches) + " pairs"
                                 : std::string("no complete assignment");
    const std::string who = name == "cost" ? std::string() : name + ": ";
    return who + "cost matrix is infeasible: " + what + " avoids the forbidden (" + (maximize ? "-inf" : "+inf") +
           ") entries";
  }
  return name + ": unknown solver status " + std::to_string(st.code);
}

template <typename T>
void solve_batch_emulated(const std::vector<ProblemView<T>>& problems, const Options& opt, int team_lanes,
                          int64_t* col_for_row, int64_t stride, double* totals) {
  PF_CHECK(team_lanes >= 1 && team_lanes <= 4096, "team_lanes must be in [1, 4096]; got ", team_lanes);
  const int64_t B = static_cast<int64_t>(problems.size());
  for (int64_t b = 0; b < B; ++b) {
    const ProblemView<T>& p = problems[b];
    PF_CHECK(p.n >= 0 && p.m >= 0 && p.n <= stride, "cost[", b, "]: bad shape (", p.n, ", ", p.m, ")");
    PF_CHECK(p.num_matches <= std::min(p.n, p.m), "num_matches[", b, "] must be in [0, min(n, m)] = [0, ",
             std::min(p.n, p.m), "]; got ", p.num_matches);
    PF_CHECK(!(opt.has_unmatched_cost && p.num_matches >= 0), "give at most one of num_matches and unmatched_cost");
  }
  std::vector<Status> status(static_cast<size_t>(B));
  EmuTeam team;
  team.W = team_lanes;
#pragma omp parallel for schedule(dynamic, 1) if (B > 1)
  for (int64_t b = 0; b < B; ++b) {
    const ProblemView<T>& p = problems[b];
    const Shape s = solved_shape(p, opt);
    const int64_t bytes = workspace_bytes<T>(s);
    std::unique_ptr<char, decltype(&std::free)> ws(static_cast<char*>(std::aligned_alloc(16, (bytes + 16) / 16 * 16)),
                                                   &std::free);
    if (!ws) {
      status[b].code = -1;
      continue;
    }
    solve_one<T>(team, p, opt, carve<T>(ws.get(), s), col_for_row + b * stride, totals + b, &status[b]);
  }
  for (int64_t b = 0; b < B; ++b) {
    if (status[b].code == -1) throw std::runtime_error("assignment (team): could not allocate a workspace");
    if (status[b].code != kOk) {
      throw std::invalid_argument(status_message(status[b], B == 1 ? "cost" : "cost[" + std::to_string(b) + "]",
                                                 problems[b].m, opt.maximize, problems[b].num_matches));
    }
  }
}

template void solve_batch_emulated<float>(const std::vector<ProblemView<float>>&, const Options&, int, int64_t*,
                                          int64_t, double*);
template void solve_batch_emulated<double>(const std::vector<ProblemView<double>>&, const Options&, int, int64_t*,
                                           int64_t, double*);

}  // namespace lsap_batch
}  // namespace pyfusion
