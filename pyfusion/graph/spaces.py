"""Space algebra of the tracer: which neuron index every tensor dimension carries.

Every dim of every value carries a *term*: an ordered (row-major) product of factors, each either an *atom*
(a union-find entity with a size: a set of neurons that must be permuted together) or a *rep* (a fixed index:
batch, tokens, spatial positions, copies). Factors are ints: ``f >= 0`` is an atom id, ``f < 0`` is a rep of
size ``-f``. An atom may be refined:

* ``("prod", factors)``: the atom is the row-major product of its children (a reshape 768 -> 12 x 64 discovers
  heads: the second factor is the *inner* dim of the first, its permutation may differ per unit);
* ``("sum", terms)``: the atom is the concatenation of the terms (a ``cat``, or GPT-2's q | k | v split);
* ``("rep",)``: the atom is pinned (a table such as rotary cos / sin varies along it, an index depends on it):
  it is no longer permutable. Pinning is always safe; a false symmetry would be a silent wrong answer;
* ``("sel", n)``: a packed leading factor that was selected index by index (``nn.MultiheadAttention``'s
  ``unflatten(-1, (3, E))`` then ``select``): its parent atom became a sum of independent copies of the tail.

Factors of size 1 carry no neurons and are dropped, except *unit atoms of size 1* (:meth:`Spaces.new_unit`): the
heads axis of a one-head attention or the key / value head of multi-query attention, found where a view splits a
feature dim into ``(1, head_dim)``. They survive resolution, so such a head is a unit group of one unit that can be
widened (one head per member at alpha = 1). Whenever one gets in the way of a rule (a sum boundary, a broadcast
against more heads, a dim an op reads without a rule for it) it is pinned, which is exactly the behaviour without
it: a pinned size-1 factor constrains nothing.

:meth:`Spaces.resolve` expands a term into a sum of products of leaf atoms and reps (a sum is only allowed as the
leading factor, where it distributes into contiguous segments; elsewhere it is pinned). :meth:`Spaces.unify`
makes two terms of equal size the same space: boundaries of sums are aligned (splitting the leading factor of a
product into a sum where needed), products get a common mixed-radix refinement (or are pinned when there is
none), leaves are merged, and a leaf meeting a rep is pinned.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Spaces", "Term"]

Term = tuple[int, ...]


class Spaces:
    """Atoms and their refinements (see the module docstring)."""

    def __init__(self) -> None:
        self.size: list[int] = []
        self.parent: list[int] = []
        self.defn: list[tuple | None] = []
        self.touched: list[bool] = []
        self.parent_of: dict[int, tuple[int, int]] = {}
        self.copies: dict[int, tuple[tuple[int, ...], list[dict[int, int]]]] = {}
        # where each leaf was pinned (the op being read when it happened), for the errors about pinned neurons
        self.context: Any = None
        self.pinned_at: dict[int, Any] = {}
        self.units1: set[int] = set()  # roots of the unit atoms of size 1 (see the module docstring)

    # ---- atoms -------------------------------------------------------------------------------------
    def new(self, size: int) -> int:
        self.size.append(int(size))
        self.parent.append(len(self.parent))
        self.defn.append(None)
        self.touched.append(False)
        return len(self.parent) - 1

    def new_unit(self) -> int:
        """A fresh unit atom of size 1 (a heads axis with one head)."""
        a = self.new(1)
        self.units1.add(a)
        return a

    def is_unit1(self, f: int) -> bool:
        """Whether factor ``f`` is a free unit atom of size 1."""
        if f < 0:
            return False
        r = self.find(f)
        return r in self.units1 and self.defn[r] is None

    def units1_of(self, t: Term) -> list[int]:
        """The free size-1 unit atoms (roots) of a term."""
        return [f for r in self.resolve(t) for f in r if f >= 0 and self.size[f] == 1]

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def fsize(self, f: int) -> int:
        return -f if f < 0 else self.size[f]

    def tsize(self, t: Term) -> int:
        return math.prod(self.fsize(f) for f in t)

    def is_leaf(self, a: int) -> bool:
        r = self.find(a)
        return self.defn[r] is None

    def refine_prod(self, a: int, sizes: list[int]) -> list[int]:
        """Refine leaf ``a`` into the row-major product of fresh atoms of ``sizes``."""
        r = self.find(a)
        assert self.defn[r] is None and math.prod(sizes) == self.size[r], (r, sizes)
        kids = [self.new(s) for s in sizes]
        self.defn[r] = ("prod", tuple(kids))
        for i, c in enumerate(kids):
            self.parent_of[c] = (r, i)
        return kids

    def refine_sum(self, a: int, sizes: list[int]) -> list[int]:
        """Refine leaf ``a`` into the concatenation of fresh atoms of ``sizes``."""
        r = self.find(a)
        assert self.defn[r] is None and sum(sizes) == self.size[r], (r, sizes)
        kids = [self.new(s) for s in sizes]
        self.defn[r] = ("sum", tuple((c,) for c in kids))
        self.touched[r] = True
        return kids

    def pin(self, f: int) -> None:
        """Pin every leaf of factor ``f`` (it becomes a rep)."""
        if f < 0:
            return
        for t in self.resolve((f,)):
            for x in t:
                if x >= 0:
                    self.defn[x] = ("rep",)
                    self.touched[x] = True
                    self.pinned_at.setdefault(x, self.context)

    def pin_term(self, t: Term) -> None:
        for f in t:
            self.pin(f)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        self.touched[ra] = self.touched[rb] = True
        if ra == rb:
            return
        assert self.defn[ra] is None and self.defn[rb] is None
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.units1:
            self.units1.add(ra)

    # ---- resolution --------------------------------------------------------------------------------
    def _res_atom(self, a: int) -> list[Term]:
        r = self.find(a)
        d = self.defn[r]
        if d is None:
            return [(r,)] if self.size[r] != 1 or r in self.units1 else [()]
        kind = d[0]
        if kind == "rep":
            return [(-self.size[r],)] if self.size[r] != 1 else [()]
        if kind == "prod":
            return self.resolve(d[1])
        if kind == "sum":
            out: list[Term] = []
            for t in d[1]:
                out += self.resolve(t)
            return out
        # "sel": a packed factor that was selected index by index; it indexes nothing permutable itself
        return [(-self.size[r],)]

    def stale_selector(self, f: int) -> None:
        """A packed factor used other than by select / views after it was selected: nothing of the packed atom
        stays permutable (its tail and the per-index copies are pinned)."""
        tail, copies = self.copies.pop(f)
        self.defn[f] = ("rep",)
        self.pinned_at.setdefault(f, self.context)
        for leaf in tail:
            self.pin(leaf)
        for c in copies:
            for x in c.values():
                self.pin(x)

    def resolve(self, term: Term) -> list[Term]:
        """The term as a sum of products of leaf atoms (roots) and reps, normalised (no size-1 factors,
        adjacent reps merged, adjacent all-rep terms merged)."""
        acc: list[Term] = [()]
        for f in term:
            if f < 0:
                if f != -1:
                    acc = [t + (f,) for t in acc]
                continue
            sub = self._res_atom(f)
            if len(sub) == 1:
                acc = [t + sub[0] for t in acc]
            elif len(acc) == 1 and self.tsize(acc[0]) == 1:
                # a sum behind one head (a unit of size 1: Glm4's multi-query key, head dims split into rotary |
                # pass-through): the segments are contiguous only while the head is one; widened, each head holds
                # its own segments, so the unit goes (the head stays one, the segments stay)
                for u in [u for u in acc[0] if self.is_unit1(u)]:
                    self.pin(u)
                acc = [acc[0] + s for s in sub]
            else:  # a sum behind a non-trivial factor: its pieces are not contiguous segments
                size = self.fsize(f)
                self.pin(f)
                acc = [t + (-size,) for t in acc]
        out: list[Term] = []
        for t in acc:
            t = self._norm_prod(t)
            if self.tsize(t) == 0:
                continue
            if out and self._is_gap(out[-1]) and self._is_gap(t):
                out[-1] = (-(self.tsize(out[-1]) + self.tsize(t)),)
            else:
                out.append(t)
        return out or [()]

    def _norm_prod(self, t: Term) -> Term:
        out: list[int] = []
        for f in t:
            if f >= 0 and self.size[f] == 1 and not self.is_unit1(f):
                continue
            if f == -1:
                continue
            if f < 0 and out and out[-1] < 0:
                out[-1] = out[-1] * -f
                continue
            out.append(f)
        return tuple(out)

    @staticmethod
    def _is_gap(t: Term) -> bool:
        return all(f < 0 for f in t)

    def atoms(self, term: Term) -> list[int]:
        """The free leaf atoms of a term (in order, with repetition)."""
        return [f for t in self.resolve(term) for f in t if f >= 0]

    def leaves(self, f: int) -> list[int]:
        return [x for t in self.resolve((f,)) for x in t if x >= 0]

    # ---- unification -------------------------------------------------------------------------------
    def unify(self, t1: Term, t2: Term) -> None:
        """Make two terms of equal size the same space (see the module docstring)."""
        for _ in range(100000):
            r1, r2 = self.resolve(t1), self.resolve(t2)
            s1 = sum(self.tsize(t) for t in r1)
            s2 = sum(self.tsize(t) for t in r2)
            if s1 != s2:
                raise AssertionError(f"unify of terms of sizes {s1} and {s2}")
            pairs = self._align(r1, r2)
            if pairs is None:
                continue
            if any(self._unify_prod(p, q) for p, q in pairs):
                continue
            return
        raise AssertionError("space unification did not converge")  # pragma: no cover

    def _align(self, r1: list[Term], r2: list[Term]) -> list[tuple[Term, Term]] | None:
        p1, p2 = list(r1), list(r2)
        i = j = 0
        pairs = []
        while i < len(p1) and j < len(p2):
            s1, s2 = self.tsize(p1[i]), self.tsize(p2[j])
            if s1 == s2:
                pairs.append((p1[i], p2[j]))
                i += 1
                j += 1
                continue
            if s1 > s2:
                res = self._split_term(p1[i], s2)
                if res is None:
                    return None
                p1[i : i + 1] = res
            else:
                res = self._split_term(p2[j], s1)
                if res is None:
                    return None
                p2[j : j + 1] = res
        return pairs

    def _split_term(self, t: Term, b: int) -> list[Term] | None:
        """Split a product term after its first ``b`` indices: locally when it leads with a rep, else by refining
        its leading leaf into a sum (then None: resolve again), or pinning it when the cut is inside the tail."""
        s = self.tsize(t)
        if self._is_gap(t):
            return [(-b,), (-(s - b),)]
        f1 = t[0]
        if self.is_unit1(f1):  # a sum inside one head: not a head structure after all
            self.pin(f1)
            return None
        rest = s // self.fsize(f1)
        if b % rest == 0:
            q = b // rest
            if f1 < 0:
                return [self._norm_prod((-q,) + t[1:]), self._norm_prod((-(-f1 - q),) + t[1:])]
            self.refine_sum(f1, [q, self.size[f1] - q])
            return None
        self.pin_term(t)
        return None

    def _unify_prod(self, p: Term, q: Term) -> bool:
        """Unify two product terms of equal size; True when something was refined or pinned (resolve again)."""
        gp, gq = self._is_gap(p), self._is_gap(q)
        if gp and gq:
            return False
        if gp or gq:
            self.pin_term(q if gp else p)
            return True
        bounds = sorted(set(self._suffix(p)) | set(self._suffix(q)))
        if any(bounds[i + 1] % bounds[i] for i in range(len(bounds) - 1)):
            self.pin_term(p)
            self.pin_term(q)
            return True
        fp, ch1 = self._refine_to(p, bounds)
        fq, ch2 = self._refine_to(q, bounds)
        if ch1 or ch2:
            return True
        if self._unify_units1(fp, fq):
            return True
        fp = [f for f in fp if not self.is_unit1(f)]
        fq = [f for f in fq if not self.is_unit1(f)]
        changed = False
        for a, b in zip(fp, fq):
            if a >= 0 and b >= 0:
                self.union(a, b)
            elif a >= 0 or b >= 0:
                self.pin(a if a >= 0 else b)
                changed = True
        return changed

    def _units1_at(self, t: list[int]) -> dict[int, list[int]]:
        """The size-1 units of a factor list by position (the number of indices of the factors after them)."""
        out: dict[int, list[int]] = {}
        after = 1
        for f in reversed(t):
            if self.is_unit1(f):
                out.setdefault(after, []).insert(0, f)
            after *= self.fsize(f)
        return out

    def _unify_units1(self, fp: list[int], fq: list[int]) -> bool:
        """Unify the size-1 units of two factor lists refined to common boundaries: units at the same position are
        merged; a unit without a partner gives one to the other side by refining the leaf that follows it there
        (``heads x head_dim`` meeting a plain ``head_dim`` axis), or is pinned (it meets a rep, or nothing).
        True when something was refined or pinned (resolve again)."""
        up, uq = self._units1_at(fp), self._units1_at(fq)
        if not up and not uq:
            return False
        changed = False
        for pos in sorted(set(up) | set(uq)):
            a, b = up.get(pos, []), uq.get(pos, [])
            for x, y in zip(a, b):
                if self.find(x) != self.find(y):
                    self.union(x, y)
                    changed = True
            extra, other = (a[len(b) :], fq) if len(a) > len(b) else (b[len(a) :], fp)
            for u in extra:
                changed = True
                after, nxt = 1, None
                for f in reversed(other):
                    if after * self.fsize(f) == pos and self.fsize(f) > 1:
                        nxt = f
                    after *= self.fsize(f)
                if nxt is not None and nxt >= 0 and self.defn[self.find(nxt)] is None:
                    head, _ = self.refine_prod(nxt, [1, self.size[self.find(nxt)]])
                    self.units1.add(head)
                    break  # resolve again: the new unit meets ``u`` at this position
                self.pin(u)
            if changed:
                return True
        return changed

    def _suffix(self, t: Term) -> list[int]:
        out = [1]
        for f in reversed(t):
            out.append(out[-1] * self.fsize(f))
        return out

    def _refine_to(self, t: Term, bounds: list[int]) -> tuple[list[int], bool]:
        """Factors of ``t`` split at every boundary of ``bounds`` (reps locally, leaves by refinement)."""
        out: list[int] = []
        changed = False
        hi = self.tsize(t)
        for f in t:
            lo = hi // self.fsize(f)
            inner = [b for b in bounds if lo < b < hi]
            if not inner:
                out.append(f)
            else:
                cuts = [hi] + sorted(inner, reverse=True) + [lo]
                sizes = [cuts[i] // cuts[i + 1] for i in range(len(cuts) - 1)]
                if f < 0:
                    out += [-s for s in sizes]
                else:
                    self.refine_prod(f, sizes)
                    changed = True
            hi = lo
        return out, changed

    # ---- reshape -----------------------------------------------------------------------------------
    def reshape(
        self, val: tuple[Term, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...], heads: bool = False
    ) -> tuple:
        """Terms of a view / reshape from ``in_shape`` to ``out_shape`` (blocks of dims with equal products;
        inside a block, factors are split where an output dim boundary falls inside them).

        Size-1 units keep their place in the row-major order: one on a size-1 input dim goes to the size-1 output
        dim at the same place, or else joins the output dim that starts there. With ``heads`` (a view, not an
        ``unsqueeze``), a size-1 output dim inserted right before the last dim whose term leads with a free atom
        (``(B, T, C) -> (B, T, 1, C)``: a one-head split) makes a size-1 unit of it."""
        if 0 in in_shape or 0 in out_shape:
            for t in val:
                for u in self.units1_of(t):
                    self.pin(u)
            return tuple((-s,) if s > 1 else () for s in out_shape)
        loose = self._loose_units1(val, in_shape)
        result = self._reshape_terms(val, in_shape, out_shape)
        if loose or heads:
            result = self._place_units1(result, loose, in_shape, out_shape, heads)
        return result

    @staticmethod
    def _after(shape: tuple[int, ...]) -> list[int]:
        """For each dim, the number of indices of the dims after it."""
        out = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            out[d] = out[d + 1] * shape[d + 1]
        return out

    def _loose_units1(self, val: tuple[Term, ...], in_shape: tuple[int, ...]) -> list[tuple[int, int]]:
        """(position, unit) for the size-1 units on size-1 input dims."""
        after = self._after(in_shape)
        return [(after[d], u) for d, s in enumerate(in_shape) if s == 1 for u in self.units1_of(val[d])]

    def _place_units1(self, result: tuple, loose: list, in_shape: tuple, out_shape: tuple, heads: bool) -> tuple:
        res = list(result)
        after = self._after(out_shape)
        ones = [d for d, s in enumerate(out_shape) if s == 1]
        taken: set[int] = set()
        for pos, u in loose:
            slot = next((d for d in ones if d not in taken and after[d] == pos), None)
            if slot is not None:
                res[slot] = (u,)
                taken.add(slot)
                continue
            start = next((d for d, s in enumerate(out_shape) if s > 1 and after[d] * s == pos), None)
            if start is not None:
                res[start] = (u,) + tuple(res[start])
            else:
                self.pin(u)
        in_ones = {p for p, s in zip(self._after(in_shape), in_shape) if s == 1}
        for d in ones:
            nxt = next((j for j in range(d + 1, len(out_shape)) if out_shape[j] > 1), None)
            if d in taken or nxt is None:
                continue
            r = self.resolve(res[nxt])
            if len(r) != 1 or not r[0]:
                continue
            lead = r[0][0]
            if self.is_unit1(lead):
                res[d], res[nxt] = (lead,), r[0][1:]
                taken.add(d)
            elif heads and nxt == d + 1 == len(out_shape) - 1 and lead >= 0 and self.size[lead] > 1:
                if after[d] in in_ones:
                    continue  # the size-1 dim was there before: not a split
                head, inner = self.refine_prod(lead, [1, self.size[lead]])
                self.units1.add(head)
                res[d], res[nxt] = (head,), (inner,) + r[0][1:]
                taken.add(d)
        return tuple(res)

    def _reshape_terms(self, val: tuple[Term, ...], in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple:
        ins = [(t, s) for t, s in zip(val, in_shape) if s != 1]
        outs_idx = [i for i, s in enumerate(out_shape) if s != 1]
        outs = [out_shape[i] for i in outs_idx]
        result: list[Term] = [() for _ in out_shape]
        i = j = 0
        while i < len(ins) and j < len(outs):
            pi, pj = ins[i][1], outs[j]
            ii, jj = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    pi *= ins[ii][1]
                    ii += 1
                else:
                    pj *= outs[jj]
                    jj += 1
            block_in = [t for t, _ in ins[i:ii]]
            block_out = outs[j:jj]
            if len(block_in) == 1 and len(block_out) == 1:
                terms = [block_in[0]]
            else:
                terms = self._reshape_block(block_in, block_out)
            for k, t in zip(range(j, jj), terms):
                result[outs_idx[k]] = t
            i, j = ii, jj
        return tuple(result)

    def _reshape_block(self, in_terms: list[Term], out_sizes: list[int]) -> list[Term]:
        queue: list[int] = [f for t in in_terms for f in t]
        out: list[Term] = []
        for osize in out_sizes:
            need = osize
            cur: list[int] = []
            while need > 1:
                f = queue.pop(0)
                fs = self.fsize(f)
                if fs == 1:
                    if self.is_unit1(f):
                        cur.append(f)
                    continue
                if need % fs == 0:
                    cur.append(f)
                    need //= fs
                    continue
                if fs % need == 0:
                    if f < 0:
                        cur.append(-need)
                        queue.insert(0, -(fs // need))
                        need = 1
                        continue
                    r = self.find(f)
                    d = self.defn[r]
                    if d is None:
                        a, b = self.refine_prod(r, [need, fs // need])
                        cur.append(a)
                        queue.insert(0, b)
                        need = 1
                        continue
                    if d[0] == "prod":
                        queue[0:0] = list(d[1])
                        continue
                    self.pin(f)  # a sum (or a pinned atom) split across dims: not a product
                    queue.insert(0, -fs)
                    continue
                # neither divides the other: merge with the next factors into one fixed block
                self.pin(f)
                g = queue.pop(0)
                self.pin(g)
                queue.insert(0, -(fs * self.fsize(g)))
            out.append(tuple(cur))
        if out:  # size-1 units after the last split stay at the end
            out[-1] = out[-1] + tuple(f for f in queue if self.is_unit1(f))
        return out

    # ---- cuts (slice / split / select) ---------------------------------------------------------------
    def cut(self, term: Term, pieces: list[tuple[int, int]]) -> list[Term]:
        """Terms of the pieces ``[lo, hi)`` of a dim: boundaries that coincide with (or can be made) segment
        boundaries give segments; a boundary inside a product's tail pins it."""
        bounds = sorted({b for lo, hi in pieces for b in (lo, hi)})
        for _ in range(10000):
            res = self.resolve(term)
            again = False
            pos = 0
            for t in res:
                s = self.tsize(t)
                inside = [b - pos for b in bounds if pos < b < pos + s]
                if inside and not self._is_gap(t):
                    f1 = t[0]
                    if self.is_unit1(f1):
                        self.pin(f1)
                        again = True
                        break
                    rest = s // self.fsize(f1)
                    if f1 >= 0 and all(b % rest == 0 for b in inside):
                        cuts = [0] + [b // rest for b in inside] + [self.size[f1]]
                        kids = self.refine_sum(f1, [cuts[i + 1] - cuts[i] for i in range(len(cuts) - 1)])
                        if self.parent_of.get(self.find(f1), (None, -1))[1] == 0:
                            # a heads axis cut into pieces (Falcon's multi-query [queries | key | value]): a piece of
                            # one head is a head, not a dropped factor
                            self.units1.update(k for k in kids if self.size[k] == 1)
                        again = True
                        break
                    if f1 < 0 and all(b % rest == 0 for b in inside):
                        pass  # a rep-led term splits locally below
                    else:
                        self.pin_term(t)
                        again = True
                        break
                pos += s
            if not again:
                break
        res = self.resolve(term)
        out = []
        for lo, hi in pieces:
            parts: list[Term] = []
            pos = 0
            for t in res:
                s = self.tsize(t)
                a, b = max(lo, pos), min(hi, pos + s)
                if a < b:
                    if a == pos and b == pos + s:
                        parts.append(t)
                    elif self._is_gap(t):
                        parts.append((-(b - a),))
                    else:  # rep-led product: take whole tail blocks
                        rest = s // self.fsize(t[0])
                        parts.append(self._norm_prod((-((b - a) // rest),) + t[1:]))
                pos += s
            out.append(self.sum_term(parts))
        return out

    def sum_term(self, parts: list[Term]) -> Term:
        """A term for the concatenation of ``parts``."""
        parts = [p for p in parts if self.tsize(p) > 0]
        if not parts:
            return ()
        if len(parts) == 1:
            return parts[0]
        if all(self._is_gap(p) for p in parts):
            return self._norm_prod((-sum(self.tsize(p) for p in parts),))
        s = self.new(sum(self.tsize(p) for p in parts))
        self.defn[s] = ("sum", tuple(parts))
        return (s,)

    # ---- packed factors (nn.MultiheadAttention, timm-style qkv) -------------------------------------------
    def packed_factor(self, term: Term) -> int | None:
        """If ``term`` is one untouched leaf that is the leading factor of an untouched product (a packed
        ``(3, E)`` unflatten), that leaf; else None."""
        if len(term) != 1 or term[0] < 0:
            return None
        f = self.find(term[0])
        if f in self.copies:
            return f
        if self.defn[f] is not None or self.touched[f] or f not in self.parent_of:
            return None
        par, pos = self.parent_of[f]
        if pos != 0 or self.find(par) != par or not self.defn[par] or self.defn[par][0] != "prod":
            return None
        tail = self.defn[par][1][1:]
        for x in tail:
            for leaf in self.leaves(x):
                if self.touched[leaf]:
                    return None
        return f

    def select_packed(self, f: int, index: int) -> dict[int, int]:
        """Substitution (tail leaf -> its copy for ``index``) after selecting index ``index`` of packed factor
        ``f``; the first call rewrites the parent product as a sum of independent copies of the tail."""
        if f not in self.copies:
            par, _ = self.parent_of[f]
            tail = self.defn[par][1][1:]
            tail_res = self.resolve(tail)
            assert len(tail_res) == 1
            leaves = tuple(x for x in tail_res[0] if x >= 0)
            copies = [{leaf: self.new(self.size[leaf]) for leaf in leaves} for _ in range(self.size[f])]
            self.defn[par] = ("sum", tuple(tuple(c.get(x, x) for x in tail_res[0]) for c in copies))
            self.defn[f] = ("sel", self.size[f])
            self.copies[f] = (leaves, copies)
        return self.copies[f][1][index]

    def substitute(self, term: Term, sub: dict[int, int]) -> Term:
        """``term`` with the leaves in ``sub`` replaced (factors containing them are expanded first)."""
        if not sub:
            return term
        out: list[int] = []
        for f in term:
            if f < 0:
                out.append(f)
                continue
            leaves = self.leaves(f)
            if not any(x in sub for x in leaves):
                out.append(f)
                continue
            res = self.resolve((f,))
            assert len(res) == 1
            out += [sub.get(x, x) if x >= 0 else x for x in res[0]]
        return tuple(out)
