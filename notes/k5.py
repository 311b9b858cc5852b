import sys; sys.path.insert(0,'.')
exec(open('notes/k3.py').read().split("for k in (1,2,3):")[0])
Xb, yb = X[:32], y[:32]
one = jax.jit(lambda s: jt._loss_and_updates(s, Xb, yb)[0])
sc = jax.jit(lambda s: jax.lax.scan(lambda c, _: (jt._loss_and_updates(c, Xb, yb)[0], 0.0), s, None, length=1)[0])
import optax
def grads(s):
    def lf(p):
        lo, upd = s.apply_fn({"params": p, "batch_stats": s.batch_stats}, Xb, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(lo, yb).mean()
    return jax.grad(lf)(s.params)
g1 = jax.jit(grads)
gs = jax.jit(lambda s: jax.lax.scan(lambda c, _: (c, grads(s)), 0, None, length=1)[1])
d=lambda u,v: max(float(np.max(np.abs(np.asarray(p)-np.asarray(q)))) for p,q in zip(jax.tree.leaves(u),jax.tree.leaves(v)))
print("state", d(one(mk()).params, sc(mk()).params))
G1=g1(mk()); GS=jax.tree.map(lambda a:a[0], gs(mk()))
print("grads", d(G1,GS), [ (k, d(G1[k],GS[k])) for k in G1])
