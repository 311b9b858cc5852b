# One step jitted vs the same step as a one-step lax.scan body, with LeNet-BN's convolution
# gradients from bnref.jax.conv (canonical_conv_grads=True) and with lax's own: values and speed.
# Run from the project root: .venv/bin/python notes/k13.py
import sys; sys.path.insert(0, '.')
import time, numpy as np, jax, jax.numpy as jnp
from bnref.jax import train as jt
from bnref.jax.models import LeNetBN
rng = np.random.default_rng(0)
X = jnp.asarray(jt.prepare_images(rng.integers(0, 256, (256, 28, 28), dtype=np.uint8)))
y = jnp.asarray(rng.integers(0, 10, 256).astype(np.int32))
def one(state, X, y):
    def body(s, _):
        s, l, c = jt._loss_and_updates(s, X, y); return s, (l, c)
    s, (l, c) = jax.lax.scan(body, state, None, length=1); return s, l[0], c[0]
plain, scan1 = jax.jit(jt._loss_and_updates), jax.jit(one)
leaves = lambda s: [np.asarray(a) for a in jax.tree.leaves((s.params, s.batch_stats))]
d = lambda a, b: max(float(np.max(np.abs(u - v))) for u, v in zip(leaves(a), leaves(b)))
def bench(f, mk, n=15):
    st = mk(); st, l, _ = f(st, X, y); l.block_until_ready(); t = time.perf_counter()
    for _ in range(n): st, l, _ = f(st, X, y)
    l.block_until_ready(); return round((time.perf_counter() - t) / n * 1e3, 1)
for canonical in (True, False):
    mk = lambda: jt.create_train_state(LeNetBN(canonical_conv_grads=canonical), jax.random.key(0), 0.5, X[:1])
    a, _, _ = plain(mk(), X, y); b, _, _ = scan1(mk(), X, y)
    print(f"canonical_conv_grads={canonical}: scan vs jit max diff {d(a, b):.3g}; ms a step: jit {bench(plain, mk)}, scan {bench(scan1, mk)}")
