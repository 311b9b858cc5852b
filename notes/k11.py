import time, functools, numpy as np, jax, jax.numpy as jnp
from bnref.jax import train as jt
from bnref.config import TrainConfig
rng=np.random.default_rng(0)
N=256*12
X=jnp.asarray(jt.prepare_images(rng.integers(0,256,(N,28,28),dtype=np.uint8))); y=jnp.asarray(rng.integers(0,10,N).astype(np.int32))
perm=jnp.asarray(np.random.default_rng(1).permutation(N).astype(np.int32))
@functools.partial(jax.jit, static_argnames=("batch_size","k"), donate_argnums=(0,1))
def unrolled(state, totals, X_all, y_all, perm, i0, *, batch_size, k):
    losses=[]
    for j in range(k):
        state, totals, loss = jt._batch_step(state, totals, X_all, y_all, perm, i0 + j, batch_size)
        state, totals, loss = jax.lax.optimization_barrier((state, totals, loss))
        losses.append(loss)
    return state, totals, jnp.stack(losses)
@functools.partial(jax.jit, static_argnames=("batch_size",), donate_argnums=(0,1))
def single(state, totals, X_all, y_all, perm, i, *, batch_size):
    return jt._batch_step(state, totals, X_all, y_all, perm, i, batch_size)
mk=lambda: jt.create_train_state(jt.make_model(TrainConfig()), jax.random.key(0), 0.5, X[:1])
leaves=lambda s: [np.asarray(a) for a in jax.tree.leaves((s.params,s.batch_stats))]
for k in (1,4,12):
    a=mk(); t=jnp.zeros(2); L=[]
    for i in range(k): a,t,l=single(a,t,X,y,perm,i,batch_size=256); L.append(float(l))
    b=mk(); t2=jnp.zeros(2)
    t0=time.perf_counter(); b,t2,l2=unrolled(b,t2,X,y,perm,0,batch_size=256,k=k); l2.block_until_ready(); tc=time.perf_counter()-t0
    d=max(float(np.max(np.abs(u-v))) for u,v in zip(leaves(a),leaves(b)))
    print(k, "param diff", d, "loss diff", max(abs(p-q) for p,q in zip(L, np.asarray(l2).tolist())), "first call s", round(tc,1), "totals", np.asarray(t)-np.asarray(t2))
# speed
def tm(f):
    s=mk(); t=jnp.zeros(2); s,t,l=f(s,t); l.block_until_ready(); t0=time.perf_counter()
    for r in range(3): s,t,l=f(s,t)
    l.block_until_ready(); return (time.perf_counter()-t0)/36*1e3
def singles(s,t):
    for i in range(12): s,t,l=single(s,t,X,y,perm,i,batch_size=256)
    return s,t,l
#("ms/step singles", tm(singles), "unrolled12", tm(lambda s,t: unrolled(s,t,X,y,perm,0,batch_size=256,k=12)))
print("per-step check")
a=mk(); t=jnp.zeros(2); b=mk(); t2=jnp.zeros(2)
b,t2,_=unrolled(b,t2,X,y,perm,0,batch_size=256,k=2)
for i in range(2): a,t,l=single(a,t,X,y,perm,i,batch_size=256)
names=[jax.tree_util.keystr(p) for p,_ in jax.tree_util.tree_leaves_with_path((a.params,a.batch_stats))]
for n,u,v in zip(names,leaves(a),leaves(b)):
    d=float(np.max(np.abs(u-v)))
    if d: print(n,d)
