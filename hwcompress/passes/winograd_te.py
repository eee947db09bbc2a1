"""TE compute of the Winograd conv kernel that ``passes.winograd`` emits (see its module doc).

TOPI's generic NHWC Winograd compute with a pre-transformed weight, for both layouts; block
names and ``schedule_rule`` attributes are TOPI's, so MetaSchedule's Winograd rules tune it.
"""

from __future__ import annotations

from .winograd_math import winograd_matrices


def _two_sided(x, mat, n: int, name: str, rule: str):
    """``out[i, j, p, c] = sum_ab x[a, b, p, c] * mat[a, i] * mat[b, j]``: a Winograd transform
    (``B^T d B`` for the data, ``A^T M A`` for the inverse) over every tile ``p`` and channel."""
    from tvm import te

    alpha = int(x.shape[0])
    r_a, r_b = te.reduce_axis((0, alpha), "r_a"), te.reduce_axis((0, alpha), "r_b")
    return te.compute(
        (n, n, x.shape[2], x.shape[3]),
        lambda i, j, p, c: te.sum(x[r_a, r_b, p, c] * mat[r_a, i] * mat[r_b, j], axis=[r_a, r_b]),
        name=name,
        attrs={"schedule_rule": rule},
    )


def winograd_te(data, weight, padding, m: int, layout: str):
    """TE compute of a Winograd conv with the pre-transformed ``weight`` ``(alpha, alpha, I, O)``.

    ``layout`` is ``"NCHW"`` or ``"NHWC"``; ``padding`` is ``(top, left, bottom, right)``.
    The blocks mirror TOPI's generic Winograd computes so that MetaSchedule's rules apply.
    """
    from tvm import te
    from tvm.topi.utils import const_matrix, get_const_tuple

    nchw = layout == "NCHW"
    if nchw:
        n, ci, h, w = get_const_tuple(data.shape)
    else:
        n, h, w, ci = get_const_tuple(data.shape)
    alpha, _, _, co = get_const_tuple(weight.shape)
    pt, pl, pb, pr = padding
    out_h, out_w = h + pt + pb - 2, w + pl + pr - 2
    nh, nw = (out_h + m - 1) // m, (out_w + m - 1) // m
    p_tiles = n * nh * nw
    dtype = str(data.dtype)
    a_np, b_np, _ = winograd_matrices(m, 3)
    A, B = const_matrix(a_np.astype(dtype), "A"), const_matrix(b_np.astype(dtype), "B")

    # Padded input, channels last whatever the layout (an NCHW input is transposed in this one
    # copy, so that every later stage reads and writes channels contiguously), and padded up to
    # whole tiles: the last tile reads nh*m + 2 rows (TOPI's NCHW compute does not pad them and
    # reads out of bounds when out_h % m != 0).
    def padded(b, y, x, c):
        inside = te.all(y >= pt, y < h + pt, x >= pl, x < w + pl)
        value = data[b, c, y - pt, x - pl] if nchw else data[b, y - pt, x - pl, c]
        return te.if_then_else(inside, value, te.const(0, dtype))

    data_pad = te.compute((n, nh * m + 2, nw * m + 2, ci), padded, name="data_pad", attrs={"schedule_rule": "None"})

    def tile_of(p):
        return p // (nh * nw), (p // nw) % nh * m, p % nw * m

    # The NHWC computes of TOPI (and MetaSchedule's nhwc rules) from here on, for both layouts.
    input_tile = te.compute(
        (alpha, alpha, p_tiles, ci),
        lambda eps, nu, p, c: data_pad[tile_of(p)[0], tile_of(p)[1] + eps, tile_of(p)[2] + nu, c],
        name="input_tile",
        attrs={"schedule_rule": "None"},
    )
    data_pack = _two_sided(input_tile, B, alpha, "data_pack", "conv2d_nhwc_winograd_data_pack")
    k = te.reduce_axis((0, ci), "ci")
    bgemm = te.compute(
        (alpha, alpha, p_tiles, co),
        lambda eps, nu, p, o: te.sum(data_pack[eps, nu, p, k] * weight[eps, nu, k, o], axis=[k]),
        name="bgemm",
        attrs={"meta_schedule.write_cache_level": [2]},
    )
    inverse = _two_sided(bgemm, A, m, "inverse", "conv2d_nhwc_winograd_inverse")

    def gather(b, y, x, o):
        return inverse[y % m, x % m, b * nh * nw + y // m * nw + x // m, o]

    if nchw:
        return te.compute((n, co, out_h, out_w), lambda b, o, y, x: gather(b, y, x, o), name="conv2d_winograd")
    return te.compute((n, out_h, out_w, co), gather, name="conv2d_winograd")
