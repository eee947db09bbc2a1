"""Calibration for pruning: read the data, run the module on it (built once for this host, the
channel masks a run-time input), and turn the results into ThiNet orders, least-squares refits
and per-group sensitivity curves."""

from __future__ import annotations

import logging

import numpy as np

from ..data import read_batches
from ..verify import host_vm
from .prune_importance import im2col, lstsq_refit, thinet_order

__all__ = ["Calibration", "CalibRunner"]

log = logging.getLogger("hwcompress")

MAX_SAMPLES = 512  # calibration samples used (the first ones)
MAX_POSITIONS = 4096  # conv output positions sampled per layer for ThiNet / refit
SENSITIVITY_POINTS = 8  # widths evaluated per group; the curve is interpolated in between
SENSITIVITY_SAMPLES = 128  # calibration samples the sensitivity runs use (many runs)


class Calibration:
    """Calibration data as given (directory, arrays, batches or ``{name: samples}``), checked
    against the model when pruning starts. Kept out of recipe files and manifests."""

    def __init__(self, data):
        self.data = data

    def __deepcopy__(self, memo):  # dataclasses.asdict copies configs: share, do not copy arrays
        return self

    def to_recipe_value(self):
        return None

    @staticmethod
    def of(calib, func) -> list[list[np.ndarray]]:
        """Batches of positional input arrays, each batch shaped like ``func``'s parameters."""
        data = calib.data if isinstance(calib, Calibration) else calib
        inputs = [(p.name, [int(d) for d in p.ty.shape.values], str(p.ty.dtype)) for p in func.params]
        return list(read_batches(data, inputs, max_samples=MAX_SAMPLES))


class CalibRunner:
    """Runs ``mod`` on the calibration batches: with channel masks (sensitivity) and with the
    conv / matmul inputs returned (ThiNet, refit)."""

    def __init__(self, mod, a, batches):
        self.mod, self.a, self.batches = mod, a, batches
        self.index = {c: i for g, comps in enumerate(a.group_comps) if a.groups[g].prunable for i, c in enumerate(comps, start=sum(len(x) for x in a.group_comps[:g]))}
        self.size = sum(len(x) for x in a.group_comps)
        self._masked = None
        self._probe = None
        self._reference = None

    # -------------------------------------------------------------------- modules

    def _run(self, vm, extra=(), samples=None):
        import tvm

        outs = []
        batches = self.batches
        if samples is not None:
            batches = batches[: max(1, samples // batches[0][0].shape[0])]
        for batch in batches:
            res = vm["main"](*(tvm.runtime.tensor(x) for x in batch), *(tvm.runtime.tensor(x) for x in extra))
            outs.append([res.numpy()] if hasattr(res, "numpy") else [r.numpy() for r in res])
        return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]

    def output_error(self, removed: set) -> float:
        """Relative squared error of the first output with the components ``removed`` zeroed."""
        from tvm import relax

        if self._masked is None:
            self._masked = host_vm(self._masked_module(relax))
            self._reference = self._run(self._masked, [np.ones(self.size + 1, "float32")], SENSITIVITY_SAMPLES)[0].astype(np.float64)
        mask = np.ones(self.size + 1, "float32")
        for c in removed:
            mask[self.index[c]] = 0.0
        y = self._run(self._masked, [mask], SENSITIVITY_SAMPLES)[0].astype(np.float64)
        ref = self._reference
        return float(((y - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))

    def _masked_module(self, relax):
        from .prune_rewrite import _emit, _rebuild, _with_main

        a, func = self.a, self.mod["main"]
        mask = relax.Var("hwc_prune_mask", relax.TensorType([self.size + 1], "float32"))
        index = self.index
        size = self.size

        def emit(bb, var, orig, value):
            new = _emit(bb, var, value)
            if var not in a.chan or not isinstance(var, relax.DataflowVar) or not isinstance(var.ty, relax.TensorType):
                return new
            idx = [index.get(a.comp(e), size) for e in a.chan[var]]
            if all(i == size for i in idx):
                return new
            shape = [1] * len(var.ty.shape.values)
            shape[a.axis[var]] = len(idx)
            m = bb.emit(relax.op.reshape(relax.op.take(mask, relax.const(np.array(idx, "int64")), axis=0, mode="clip"), shape))
            if str(var.ty.dtype) != "float32":
                m = bb.emit(relax.op.astype(m, str(var.ty.dtype)))
            return bb.emit(relax.op.multiply(new, m), name_hint=var.name + "_mask")

        return _with_main(self.mod, _rebuild(func, emit, extra_params=[mask]))

    def _probe_outputs(self):
        """``{consumer data var: samples}`` of the unpruned module."""
        if self._probe is None:
            from .prune_rewrite import _rebuild, _with_main

            wanted = []
            for _var, data, _w, _kind in self.a.consumers:
                if data not in wanted:
                    wanted.append(data)
            func = self.mod["main"]
            probed = _rebuild(func, _emit_plain, extra_outputs=wanted)
            vm = host_vm(_with_main(self.mod, probed))
            res = self._run(vm)
            self._probe = dict(zip(wanted, res[1:]))
        return self._probe

    # -------------------------------------------------------------------- criteria

    def _contributions(self, var, data, w, kind, rng):
        """``(gram over input positions, patches/inputs, Y)`` of one consumer."""
        x = self._probe_outputs()[data].astype(np.float64)
        if kind == "matmul":
            x = x.reshape(-1, x.shape[-1])
            return (x.T @ x) * (w @ w.T), x, x @ w
        call = _binding_value(self.a.func, var)
        attrs = call.attrs
        o, cin = w.shape[0], w.shape[1]
        kernel = w.shape[2:]
        n, _c, h, wd = x.shape
        oh = (h + int(attrs.padding[0]) + int(attrs.padding[2]) - int(attrs.dilation[0]) * (kernel[0] - 1) - 1) // int(attrs.strides[0]) + 1
        ow = (wd + int(attrs.padding[1]) + int(attrs.padding[3]) - int(attrs.dilation[1]) * (kernel[1] - 1) - 1) // int(attrs.strides[1]) + 1
        total = n * oh * ow
        positions = np.sort(rng.choice(total, size=min(total, MAX_POSITIONS), replace=False))
        p = im2col(x, kernel, [int(s) for s in attrs.strides], [int(s) for s in attrs.padding], [int(s) for s in attrs.dilation], positions)
        wk = w.reshape(o, cin, -1).astype(np.float64)
        z = np.einsum("mck,ock->cmo", p, wk).reshape(cin, -1)
        return z @ z.T, p, p.reshape(len(positions), -1) @ wk.reshape(o, -1).T

    def thinet_orders(self) -> list[list[int]]:
        """Per group, components in ThiNet removal order (greedy over all consumers)."""
        a = self.a
        rng = np.random.default_rng(0)
        grams = [np.zeros((len(c), len(c))) for c in a.group_comps]
        pos_of = [{c: i for i, c in enumerate(comps)} for comps in a.group_comps]
        for var, data, w, kind in a.consumers:
            gram, _p, y = self._contributions(var, data, w, kind, rng)
            gram = gram / max(float((y**2).sum()), 1e-30)
            comps = [a.comp(e) for e in a.chan[data]]
            for g, comps_g in enumerate(a.group_comps):
                if not a.groups[g].prunable:
                    continue
                rows = [j for j, c in enumerate(comps) if c in pos_of[g]]
                if not rows:
                    continue
                s = np.zeros((len(comps), len(comps_g)))
                for j in rows:
                    s[j, pos_of[g][comps[j]]] = 1.0
                grams[g] += s.T @ gram @ s
        orders = []
        for g, comps in enumerate(a.group_comps):
            orders.append([comps[i] for i in thinet_order(grams[g], len(comps))] if a.groups[g].prunable else list(comps))
        return orders

    def refit(self, removed: set) -> dict:
        """Least-squares refit of every conv / matmul that loses input channels:
        ``{binding name: full-size weight}``."""
        a = self.a
        rng = np.random.default_rng(1)
        out = {}
        for var, data, w, kind in a.consumers:
            keep = a.kept(data, removed)
            if len(keep) == len(a.chan[data]):
                continue
            _gram, p, y = self._contributions(var, data, w, kind, rng)
            new = np.zeros(w.shape, dtype=np.float64)
            if kind == "matmul":
                new[keep] = lstsq_refit(p[:, keep], y)
            else:
                o = w.shape[0]
                fit = lstsq_refit(p[:, keep, :].reshape(p.shape[0], -1), y)
                new[:, keep] = fit.T.reshape(o, len(keep), *w.shape[2:])
            out[var.name] = new.astype(w.dtype)
        return out

    def sensitivity(self, orders, choices, floor) -> dict:
        """``{group: {width: output error}}`` for every group with a choice of widths."""
        curves = {}
        for g, widths in enumerate(choices):
            if len(widths) < 2:
                continue
            n = widths[0]
            cand = [w for w in widths[1:] if w >= floor[g]]
            if len(cand) > SENSITIVITY_POINTS:
                pick = np.unique(np.linspace(0, len(cand) - 1, SENSITIVITY_POINTS).round().astype(int))
                cand = [cand[i] for i in pick]
            curve, worst = {n: 0.0}, 0.0
            for w in cand:  # widest first: the error can only grow as channels go
                worst = max(worst, self.output_error(set(orders[g][: n - w])))
                curve[w] = worst
            curves[g] = curve
        log.info("prune: sensitivity of %d groups on %d calibration batches", len(curves), len(self.batches))
        return curves


def _emit_plain(bb, var, orig, value):
    from .prune_rewrite import _emit

    return _emit(bb, var, value)


def _binding_value(func, var):
    for block in func.body.blocks:
        for b in block.bindings:
            if b.var.same_as(var):
                return b.value
    raise KeyError(var.name)
