"""A short assignment example: match the neurons of a network to a permuted, noisy copy of it."""

import numpy as np

import pyfusion

rng = np.random.default_rng(0)
acts = rng.standard_normal((2048, 256))  # activations of 256 neurons
perm = rng.permutation(256)
copy = acts[:, perm] + 0.5 * rng.standard_normal((2048, 256))  # the same neurons, shuffled and noisy
corr = np.corrcoef(acts.T, copy.T)[:256, 256:]

full = pyfusion.ops.linear_assignment(corr, maximize=True)
print(f"full matching: {np.mean(perm[full.col_ind] == full.row_ind):.1%} of neurons recovered")

partial = pyfusion.ops.linear_assignment(-corr, num_matches=192)  # fuse 75%, isolate the rest
print(
    f"partial matching: {len(partial.row_ind)} pairs, {len(partial.unmatched_rows)} rows isolated, "
    f"total cost {partial.cost:.2f}"
)

batch = pyfusion.ops.linear_assignment(rng.random((8, 128, 128)))  # 8 problems in one call
print("batched objectives:", np.round(batch.cost, 3))
