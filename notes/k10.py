import numpy as np, jax, jax.numpy as jnp, re, collections
from bnref.jax import train as jt
from bnref.config import TrainConfig
rng=np.random.default_rng(0)
X=jnp.asarray(jt.prepare_images(rng.integers(0,256,(256,28,28),dtype=np.uint8))); y=jnp.asarray(rng.integers(0,10,256).astype(np.int32))
st=jt.create_train_state(jt.make_model(TrainConfig()), jax.random.key(0), 0.5, X[:1])
for name,f in (("plain",jt._loss_and_updates),("scan1",jt._one_step)):
    txt=jax.jit(f).lower(st,X,y).compile().as_text()
    ops=collections.Counter(re.findall(r"= \S+ (convolution|custom-call|fusion|while|transpose|copy)\(", txt))
    print(name, dict(ops))
    for m in re.findall(r"convolution\([^\n]*", txt)[:8]: print("  ", m[:200])
    open(f"/tmp/x/{name}.hlo","w").write(txt)
