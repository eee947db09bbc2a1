"""TE compute of the Winograd conv kernel that ``passes.winograd`` emits (see its module doc).

Stages (block names), each reading and writing channels contiguously whatever the layout:

* ``data_pad``: the padded input, channels last, padded up to whole tiles;
* ``data_pack_rows`` -> ``data_pack``: the data transform ``B^T d B`` as two one-sided
  products (``2 * alpha^3`` multiply-adds per tile and channel before the zeros and ones of
  ``B`` fold away, against ``alpha^4`` for the two-sided sum);
* ``bgemm``: ``alpha^2`` GEMMs over the input channels, with the transformed weight packed as
  ``(alpha, alpha, O/ob, I, ob)``: the ``ob`` output channels of a register tile contiguous for
  every input channel (``ob = O``: the plain ``(alpha, alpha, I, O)`` order);
* ``inverse_rows`` -> ``inverse``: ``A^T M A``, two one-sided products again;
* ``conv2d_winograd``: the output gathered from the tiles (NCHW or NHWC).

Stages carry ``hwc.winograd`` annotations by which the CPU backend's default schedule finds
them; MetaSchedule tunes the kernel with its generic rules.
"""

from __future__ import annotations

from .winograd_math import winograd_matrices

STAGE_ATTR = "hwc.winograd"


def _one_sided(x, mat, n: int, axis: int, name: str):
    """``out = mat^T x`` along ``axis`` (0 or 1) of ``x[a, b, p, c]``:
    ``out[i, b, p, c] = sum_a x[a, b, p, c] * mat[a, i]`` (axis 0), or over ``b`` (axis 1)."""
    from tvm import te

    alpha = int(x.shape[axis])
    r = te.reduce_axis((0, alpha), f"r_{name}")
    if axis == 0:
        shape = (n, x.shape[1], x.shape[2], x.shape[3])
        return te.compute(shape, lambda i, b, p, c: te.sum(x[r, b, p, c] * mat[r, i], axis=[r]), name=name, attrs={STAGE_ATTR: name})
    shape = (x.shape[0], n, x.shape[2], x.shape[3])
    return te.compute(shape, lambda a, j, p, c: te.sum(x[a, r, p, c] * mat[r, j], axis=[r]), name=name, attrs={STAGE_ATTR: name})


def winograd_te(data, weight, padding, m: int, layout: str):
    """TE compute of a Winograd conv with the pre-transformed, packed ``weight``
    ``(alpha, alpha, O/ob, I, ob)``.

    ``layout`` is ``"NCHW"`` or ``"NHWC"``; ``padding`` is ``(top, left, bottom, right)``.
    """
    from tvm import te
    from tvm.topi.utils import const_matrix, get_const_tuple

    nchw = layout == "NCHW"
    if nchw:
        n, ci, h, w = get_const_tuple(data.shape)
    else:
        n, h, w, ci = get_const_tuple(data.shape)
    alpha, _, n_ob, _, ob = get_const_tuple(weight.shape)
    co = n_ob * ob
    pt, pl, pb, pr = padding
    out_h, out_w = h + pt + pb - 2, w + pl + pr - 2
    nh, nw = (out_h + m - 1) // m, (out_w + m - 1) // m
    p_tiles = n * nh * nw
    dtype = str(data.dtype)
    a_np, b_np, _ = winograd_matrices(m, 3)
    A, B = const_matrix(a_np.astype(dtype), "A"), const_matrix(b_np.astype(dtype), "B")

    # Padded input, channels last whatever the layout (an NCHW input is transposed in this one
    # copy), and padded up to whole tiles: the last tile reads nh*m + 2 rows.
    def padded(b, y, x, c):
        inside = te.all(y >= pt, y < h + pt, x >= pl, x < w + pl)
        value = data[b, c, y - pt, x - pl] if nchw else data[b, y - pt, x - pl, c]
        return te.if_then_else(inside, value, te.const(0, dtype))

    data_pad = te.compute((n, nh * m + 2, nw * m + 2, ci), padded, name="data_pad", attrs={STAGE_ATTR: "data_pad"})

    def tile_of(p):
        return p // (nh * nw), (p // nw) % nh * m, p % nw * m

    input_tile = te.compute(
        (alpha, alpha, p_tiles, ci),
        lambda eps, nu, p, c: data_pad[tile_of(p)[0], tile_of(p)[1] + eps, tile_of(p)[2] + nu, c],
        name="input_tile",
    )
    rows = _one_sided(input_tile, B, alpha, 0, "data_pack_rows")
    data_pack = _one_sided(rows, B, alpha, 1, "data_pack")
    k = te.reduce_axis((0, ci), "ci")
    bgemm = te.compute(
        (alpha, alpha, p_tiles, co),
        lambda eps, nu, p, o: te.sum(data_pack[eps, nu, p, k] * weight[eps, nu, o // ob, k, o % ob], axis=[k]),
        name="bgemm",
        attrs={STAGE_ATTR: "bgemm"},
    )
    inverse_rows = _one_sided(bgemm, A, m, 0, "inverse_rows")
    inverse = _one_sided(inverse_rows, A, m, 1, "inverse")

    def gather(b, y, x, o):
        return inverse[y % m, x % m, b * nh * nw + y // m * nw + x // m, o]

    if nchw:
        return te.compute((n, co, out_h, out_w), lambda b, o, y, x: gather(b, y, x, o), name="conv2d_winograd")
    return te.compute((n, out_h, out_w, co), gather, name="conv2d_winograd")


def pack_weights(u, block: int):
    """``(alpha, alpha, I, O)`` -> ``(alpha, alpha, O/block, I, block)`` (numpy)."""
    import numpy as np

    a, b, i, o = u.shape
    if o % block:
        raise ValueError(f"{o} output channels are not a multiple of the block {block}")
    return np.ascontiguousarray(u.reshape(a, b, i, o // block, block).transpose(0, 1, 3, 2, 4))
