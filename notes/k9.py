import time, numpy as np, jax, jax.numpy as jnp, functools
from bnref.jax import train as jt
from bnref.config import TrainConfig
rng=np.random.default_rng(0)
X=jnp.asarray(jt.prepare_images(rng.integers(0,256,(256,28,28),dtype=np.uint8))); y=jnp.asarray(rng.integers(0,10,256).astype(np.int32))
plain=jax.jit(jt._loss_and_updates, donate_argnums=(0,))
scan1=jax.jit(jt._one_step, donate_argnums=(0,))
def bench(f, n=30):
    st=jt.create_train_state(jt.make_model(TrainConfig()), jax.random.key(0), 0.5, X[:1])
    st,l,_=f(st,X,y); l.block_until_ready()
    t=time.perf_counter()
    for _ in range(n): st,l,_=f(st,X,y)
    l.block_until_ready(); return (time.perf_counter()-t)/n*1e3
for r in range(3): print("plain ms", bench(plain), "scan1 ms", bench(scan1))
