import time, numpy as np, jax, jax.numpy as jnp, functools
from bnref.jax import train as jt
from bnref.config import TrainConfig
rng=np.random.default_rng(0)
X=jnp.asarray(jt.prepare_images(rng.integers(0,256,(256,28,28),dtype=np.uint8))); y=jnp.asarray(rng.integers(0,10,256).astype(np.int32))
def one(state, X, y):
    def body(s, _):
        s, l, c = jt._loss_and_updates(s, X, y); return s, (l, c)
    s, (l, c) = jax.lax.scan(body, state, None, length=1); return s, l[0], c[0]
plain=jax.jit(jt._loss_and_updates, donate_argnums=(0,))
scan1=jax.jit(one, donate_argnums=(0,))
mk=lambda: jt.create_train_state(jt.make_model(TrainConfig()), jax.random.key(0), 0.5, X[:1])
a,_,_=plain(mk(),X,y); b,_,_=scan1(mk(),X,y)
print("diff", max(float(np.max(np.abs(np.asarray(u)-np.asarray(v)))) for u,v in zip(jax.tree.leaves(a.params),jax.tree.leaves(b.params))))
def bench(f, n=20):
    st=mk(); st,l,_=f(st,X,y); l.block_until_ready(); t=time.perf_counter()
    for _ in range(n): st,l,_=f(st,X,y)
    l.block_until_ready(); return (time.perf_counter()-t)/n*1e3
print("plain ms", round(bench(plain),1), "scan1 ms", round(bench(scan1),1))
