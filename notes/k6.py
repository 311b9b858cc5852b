import sys; sys.path.insert(0,'.')
exec(open('notes/k3.py').read().split("for k in (1,2,3):")[0])
for k in (1,2,3,5):
    a=mk(); t=jnp.zeros(2)
    for i in range(k): a,t,_=jt._fit_steps(a,t,X,y,perm,i,batch_size=32,k=1)
    b=mk(); t2=jnp.zeros(2)
    b,t2,_=jt._fit_steps(b,t2,X,y,perm,0,batch_size=32,k=k)
    d=max(float(np.max(np.abs(u-v))) for u,v in zip(leaves(a),leaves(b)))
    print("k x scan1 vs scank", k, d)
