"""jit_with_options: array options are traced (one compilation serves every layer's tables), fixed
options are baked in, and a changed fixed option gets its own compilation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from condensa.eval.bench.timing import first_output, jit_with_options


def test_array_options_share_one_compile_and_fixed_ones_do_not():
    traces = []

    def kernel(x, *, scale, table, constant=None):
        traces.append(scale)
        extra = 0.0 if constant is None else float(np.sum(constant))
        return x * scale + table.sum() + extra, "stats"

    layer0 = jit_with_options(first_output(kernel), scale=2.0, table=jnp.asarray(np.ones(3, np.float32)))
    layer1 = jit_with_options(first_output(kernel), scale=2.0, table=jnp.asarray(np.full(3, 2.0, np.float32)))
    x = jnp.arange(2.0)
    np.testing.assert_allclose(layer0(x), x * 2 + 3)
    np.testing.assert_allclose(layer1(x), x * 2 + 6)  # the second table is used, not the first's constant
    assert traces == [2.0]  # one trace for both layers
    other = jit_with_options(first_output(kernel), scale=3.0, table=jnp.ones(3), constant=np.ones(2))
    np.testing.assert_allclose(other(x), x * 3 + 3 + 2)  # an unhashable NumPy option is baked in
    assert traces == [2.0, 3.0]
