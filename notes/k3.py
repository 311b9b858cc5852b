import sys; sys.path.insert(0,'.')
import numpy as np, jax, jax.numpy as jnp, functools
from bnref.jax import train as jt
from bnref.jax.models import LeNetBN
rng=np.random.default_rng(0)
X=jnp.asarray(jt.prepare_images(rng.integers(0,256,(300,28,28),dtype=np.uint8))); y=jnp.asarray(rng.integers(0,10,300).astype(np.int32))
perm=jnp.asarray(np.random.default_rng(1).permutation(300).astype(np.int32))
def mk(): return jt.create_train_state(LeNetBN(), jax.random.key(0), 0.5, X[:1])
def leaves(st): return [np.asarray(a) for a in jax.tree.leaves((st.params, st.batch_stats))]
for k in (1,2,3):
    a=mk(); t=jnp.zeros(2)
    for i in range(k): a,t,_=jt._fit_step(a,t,X,y,perm,i,batch_size=32)
    b=mk(); t2=jnp.zeros(2)
    b,t2,_=jt._fit_steps(b,t2,X,y,perm,0,batch_size=32,k=k)
    d=max(float(np.max(np.abs(u-v))) for u,v in zip(leaves(a),leaves(b)))
    print(k, d)
