import numpy as np, jax, jax.numpy as jnp, itertools
from bnref.jax import train as jt
from bnref.config import TrainConfig
rng=np.random.default_rng(0)
X=jnp.asarray(jt.prepare_images(rng.integers(0,256,(300,28,28),dtype=np.uint8))); y=jnp.asarray(rng.integers(0,10,300).astype(np.int32))
def run(K):
    st=jt.create_train_state(jt.make_model(TrainConfig()), jax.random.key(0), 0.5, X[:1])
    losses=[]
    for s in jt.train_steps(st, X, y, seed=0, batch_size=32, epochs=(1,2), steps_per_call=K):
        losses.append(float(s.loss))
        if s.step==s.steps and s.epoch==2: final=jax.tree.map(np.asarray,(s.state.params,s.state.batch_stats))
    return losses, final
l1,f1=run(1)
for K in (2,4,9):
    lk,fk=run(K)
    print(K, max(abs(a-b) for a,b in zip(l1,lk)), max(float(np.max(np.abs(a-b))) for a,b in zip(jax.tree.leaves(f1),jax.tree.leaves(fk))))
st=jt.create_train_state(jt.make_model(TrainConfig()), jax.random.key(0), 0.5, X[:1])
from bnref.schedule import epoch_permutation
p=epoch_permutation(0,1,300)
for i in range(9):
    st,l,_=jt.train_step(st, X[p[i*32:(i+1)*32]], y[p[i*32:(i+1)*32]])
    assert float(l)==l1[i], (i, float(l), l1[i])
print("train_step == train_steps")
