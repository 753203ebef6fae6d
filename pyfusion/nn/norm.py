"""Member-view normalization: how a LayerNorm / RMSNorm over a widened (partially fused) stream is defined.

A LayerNorm or RMSNorm reads all neurons of its stream at once, so widening the stream (partial fusion,
clustering, the ensemble) is not a per-neuron operation: normalizing the fused stream ``x`` (slots wide) as one
vector would mix the members' statistics. The rule (DESIGN §3 vocabulary; chosen by the lead, issue 12 item 3)
is: every member sees its own view of the fused stream, normalizes it with its own module, and the results are
recombined with the group's maps,

    y = sum_k A_k norm_k(B_k x),

with ``B_k`` (n x slots) the map that reads member k's neurons from the input slots and ``A_k`` (slots x n) the
map that writes member k's neurons into the output slots (it carries lambda_k on shared slots and 1 on member
k's branch slots), exactly as for a Linear layer ``W' = sum_k A_k W_k B_k``. Consequences:

* alpha = 1 (the ensemble layout ``[branch_1 | ... | branch_K]``): each member's segment is normalized over its
  own neurons with its own parameters, so the fused network is exactly ``sum_k lambda_k f_k(x)``;
* full fusion by permutations (``A_k = lambda_k P_k``, ``B_k = P_k^T``): ``y`` equals one norm with the combined
  parameters ``sum_k A_k w_k`` (the statistics of a vector do not depend on its order), which is what the builder
  then keeps instead of this module;
* any other maps (an intermediate alpha: shared slots read by every member, branch slots by one; soft OT maps;
  cluster maps): each member's normalization sees exactly the neurons it had before fusion (read from the slots
  they were mapped to), and a shared slot receives the lambda-weighted combination of the members' normalized
  values.

Selection maps (one 1 per row of ``B_k``; at most one non-zero per column of ``A_k``) run as a gather and a
scatter; other maps as dense products.

The maps act on one axis, ``dim``: the last for a LayerNorm over channels-last features, ``-3`` for a
channels-first normalizer of ``(batch, channels, height, width)`` maps (ConvNeXt's ``LayerNorm`` with
``data_format="channels_first"``, a ``LayerNorm2d``); ``norm_k`` is the member's own module, so it receives
member k's view in the layout it was written for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MemberViewNorm"]


def _gather_index(b: Tensor) -> Tensor | None:
    """Column of the single 1 of every row of ``b`` (n x slots), or None when ``b`` is not such a selection."""
    nz = b != 0
    if not bool((nz.sum(1) == 1).all()):
        return None
    idx = nz.float().argmax(1)
    if not bool((b[torch.arange(b.shape[0]), idx] == 1).all()):
        return None
    return idx


def _scatter(a: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(rows, cols, values) of ``a`` (slots x n) when every column has at most one non-zero, else None."""
    nz = a != 0
    if bool((nz.sum(0) > 1).any()):
        return None
    rows, cols = nz.nonzero(as_tuple=True)
    return rows, cols, a[rows, cols]


class MemberViewNorm(nn.Module):
    """``y = sum_k A_k norm_k(B_k x)`` along dimension ``dim`` (see the module docstring).

    Args:
        norms: member k's own normalization module (width n_k), e.g. ``nn.LayerNorm``, an RMSNorm class.
        A: K maps (slots, n_k): member k's normalized neurons into the output slots.
        B: K maps (n_k, slots): member k's neurons read from the input slots.
        dim: the (negative) axis of the input and output that holds the features.

    Shapes:
        input ``(..., slots)``, output ``(..., slots)`` for ``dim=-1``; ``(..., slots, *rest)`` with
        ``len(rest) == -dim - 1`` in general.
    """

    # pyfusion.graph reads this module as one normalizer of its stream (output space = input space)
    __pyfusion_opaque__ = "normalizer"

    def __init__(self, norms: Sequence[nn.Module], A: Sequence[Tensor], B: Sequence[Tensor], dim: int = -1):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim >= 0:
            raise ValueError(f"dim must be a negative integer (the axis counted from the end); got {dim!r}")
        if not (len(norms) == len(A) == len(B)) or not norms:
            raise ValueError(f"norms, A and B must have one entry per member; got {len(norms)}, {len(A)}, {len(B)}")
        slots = int(A[0].shape[0])
        for k, (a, b) in enumerate(zip(A, B)):
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != slots or b.shape != (a.shape[1], slots):
                raise ValueError(
                    f"member {k}: A must be (slots, n) and B (n, slots) with slots={slots}; got A {tuple(a.shape)}, "
                    f"B {tuple(b.shape)}"
                )
        self.norms = nn.ModuleList(norms)
        self.slots = slots
        self.dim = dim
        self.num_members = len(norms)
        p = next((t for m in norms for t in m.parameters()), None)
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.get_default_dtype()
        self._gather: list[bool] = []
        self._scatter: list[bool] = []
        for k, (a, b) in enumerate(zip(A, B)):
            a, b = a.detach().cpu(), b.detach().cpu()
            idx = _gather_index(b)
            if idx is not None:
                self.register_buffer(f"b_index_{k}", idx.long())
            else:
                self.register_buffer(f"b_map_{k}", b.to(dtype).contiguous())
            self._gather.append(idx is not None)
            sc = _scatter(a)
            if sc is not None:
                self.register_buffer(f"a_rows_{k}", sc[0].long())
                self.register_buffer(f"a_cols_{k}", sc[1].long())
                self.register_buffer(f"a_vals_{k}", sc[2].to(dtype))
            else:
                self.register_buffer(f"a_map_{k}", a.to(dtype).contiguous())
            self._scatter.append(sc is not None)

    def forward(self, x: Tensor) -> Tensor:
        d = self.dim
        if x.dim() < -d or x.shape[d] != self.slots:
            raise ValueError(f"MemberViewNorm expects {self.slots} features in dim {d}; got {tuple(x.shape)}")
        y = x.new_zeros(x.shape)
        for k, norm in enumerate(self.norms):
            if self._gather[k]:
                xk = x.index_select(d, getattr(self, f"b_index_{k}"))
            else:
                xk = (x.movedim(d, -1) @ getattr(self, f"b_map_{k}").to(x.dtype).T).movedim(-1, d)
            zk = norm(xk)
            if self._scatter[k]:
                vals = getattr(self, f"a_vals_{k}").to(zk.dtype)
                src = zk.index_select(d, getattr(self, f"a_cols_{k}")) * vals.reshape((-1,) + (1,) * (-d - 1))
                y = y.index_add(d, getattr(self, f"a_rows_{k}"), src)
            else:
                y = y + (zk.movedim(d, -1) @ getattr(self, f"a_map_{k}").to(zk.dtype).T).movedim(-1, d)
        return y

    def extra_repr(self) -> str:
        return f"slots={self.slots}, members={self.num_members}" + (f", dim={self.dim}" if self.dim != -1 else "")
