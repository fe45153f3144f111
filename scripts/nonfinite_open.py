"""Open non-finite cases (issue 12, item 1): the rows of tests/test_nonfinite.py that are not run in CI
(its OPEN set), as small repros printing what each backend gives next to the torch composition.
See docs/RELIABILITY.md ("Open: non-finite values at hidden keys").

    python scripts/nonfinite_open.py
"""
import torch, pyllm, pyllm.functional as PF
NAN, INF = float("nan"), float("inf")
torch.manual_seed(0)
def run(be, f):
    with pyllm.use_backend(be):
        return f()
BES = ("native", "torch", "cuda-emulated")

print("== G1/G2 masked_softmax bool mask: NaN grad_output at a hidden key (row 0) and in a fully masked row (row 1)")
x0 = torch.randn(2, 4); keep = torch.tensor([[True, True, True, False], [False] * 4])
g = torch.randn(2, 4); g[0, 3] = NAN; g[1, 1] = NAN
for be in BES:
    x = x0.clone().requires_grad_()
    y = run(be, lambda: PF.masked_softmax(x, keep)); (dx,) = torch.autograd.grad(y, x, g)
    print(be, dx.tolist())
x = x0.double().requires_grad_()
s = x.masked_fill(~keep, -INF); dead = (s == -INF).all(-1, keepdim=True)
y = s.masked_fill(dead, 0).softmax(-1).masked_fill(dead, 0); (dx,) = torch.autograd.grad(y, x, g.double())
print("torch", dx.tolist())

print("== G1 masked_softmax additive mask: NaN grad_output in a fully masked row (row 1 all -inf)")
m = torch.zeros(2, 4); m[1] = -INF
g = torch.randn(2, 4); g[1, 1] = NAN
for be in BES:
    x = x0.clone().requires_grad_()
    y = run(be, lambda: PF.masked_softmax(x, m)); (dx,) = torch.autograd.grad(y, x, g)
    print(be, dx[1].tolist())

print("== G3 attention bool mask: NaN grad_output of query 0, key 2 hidden from query 0 only -> dK[key 2]")
q0, k0, v0 = (torch.randn(1, 1, 2, 4) for _ in range(3)); k0 = torch.randn(1, 1, 3, 4); v0 = torch.randn(1, 1, 3, 4)
keep = torch.tensor([[True, True, False], [True, True, True]]).view(1, 1, 2, 3)
g = torch.randn(1, 1, 2, 4); g[0, 0, 0, 1] = NAN
for be in BES:
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    o = run(be, lambda: PF.scaled_dot_product_attention(q, k, v, keep)); dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
    print(be, "dk[2]", dk[0, 0, 2].tolist(), "dv[2]", dv[0, 0, 2].tolist())
q, k, v = (t.double().requires_grad_() for t in (q0, k0, v0))
s = (q @ k.transpose(-1, -2)) * 0.5
o = s.masked_fill(~keep, -INF).softmax(-1) @ v; dq, dk, dv = torch.autograd.grad(o, (q, k, v), g.double())
print("torch", "dk[2]", dk[0, 0, 2].tolist(), "dv[2]", dv[0, 0, 2].tolist())

print("== G4 varlen causal, one sequence of 3: NaN in V of key 2 (hidden from queries 0, 1 by causality)")
q0, k0, v0 = (torch.randn(3, 1, 4) for _ in range(3)); v0[2, 0, 1] = NAN
cu = torch.tensor([0, 3], dtype=torch.int32)
for be in BES:
    o = run(be, lambda: PF.varlen_attention(q0, k0, v0, cu, cu, 3, 3, causal=True))
    print(be, torch.isnan(o[:, 0]).int().tolist())
q, k, v = (t.double().transpose(0, 1) for t in (q0, k0, v0))
keep = torch.arange(3) <= torch.arange(3)[:, None]
o = ((q @ k.transpose(-1, -2)) * 0.5).masked_fill(~keep, -INF).softmax(-1) @ v
print("torch", torch.isnan(o[0]).int().tolist())

print("== G4b dense attention, bool mask hides key 2 from query 0: NaN in K of key 2 -> dQ[query 0]")
q0 = torch.randn(1, 1, 2, 4); k0 = torch.randn(1, 1, 3, 4); v0 = torch.randn(1, 1, 3, 4); k0[0, 0, 2, 1] = NAN
keep = torch.tensor([[True, True, False], [True, True, True]]).view(1, 1, 2, 3)
g = torch.randn(1, 1, 2, 4)
for be in BES:
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    o = run(be, lambda: PF.scaled_dot_product_attention(q, k, v, keep)); dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
    print(be, "out0", o[0, 0, 0].tolist(), "dq0", dq[0, 0, 0].tolist())
q, k, v = (t.double().requires_grad_() for t in (q0, k0, v0))
s = (q @ k.transpose(-1, -2)) * 0.5
o = s.masked_fill(~keep, -INF).softmax(-1) @ v; dq, dk, dv = torch.autograd.grad(o, (q, k, v), g.double())
print("torch", "out0", o[0, 0, 0].tolist(), "dq0", dq[0, 0, 0].tolist())

print("== G5 additive mask: NaN in the mask of query 0 (key 2 at -inf for query 0) -> dV/dK of key 2")
q0 = torch.randn(1, 1, 2, 4); k0 = torch.randn(1, 1, 3, 4); v0 = torch.randn(1, 1, 3, 4)
m = torch.zeros(1, 1, 2, 3); m[0, 0, 0, 2] = -INF; m[0, 0, 0, 0] = NAN
g = torch.randn(1, 1, 2, 4)
for be in BES:
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    o = run(be, lambda: PF.scaled_dot_product_attention(q, k, v, m)); dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
    print(be, "dk[2]", dk[0, 0, 2].tolist(), "dv[2]", dv[0, 0, 2].tolist())
q, k, v = (t.double().requires_grad_() for t in (q0, k0, v0))
o = ((q @ k.transpose(-1, -2)) * 0.5 + m.double()).softmax(-1) @ v; dq, dk, dv = torch.autograd.grad(o, (q, k, v), g.double())
print("torch", "dk[2]", dk[0, 0, 2].tolist(), "dv[2]", dv[0, 0, 2].tolist())

print("== G6 fully masked query 1 (bool): -Inf in V; NaN grad_output of query 1 -> dV; NaN in K -> dQ[1]")
q0 = torch.randn(1, 1, 2, 4); k0 = torch.randn(1, 1, 3, 4); v0 = torch.randn(1, 1, 3, 4)
keep = torch.tensor([[True, True, True], [False, False, False]]).view(1, 1, 2, 3)
for be in BES:
    v = v0.clone(); v[0, 0, 1, 3] = -INF
    o = run(be, lambda: PF.scaled_dot_product_attention(q0, k0, v, keep))
    g = torch.randn(1, 1, 2, 4); g[0, 0, 1, 0] = NAN
    q, k, vv = (t.clone().requires_grad_() for t in (q0, k0, v0))
    o2 = run(be, lambda: PF.scaled_dot_product_attention(q, k, vv, keep)); _, _, dv = torch.autograd.grad(o2, (q, k, vv), g)
    kk = k0.clone(); kk[0, 0, 2, 2] = NAN
    q, k = q0.clone().requires_grad_(), kk.clone().requires_grad_()
    o3 = run(be, lambda: PF.scaled_dot_product_attention(q, k, v0, keep)); dq, _ = torch.autograd.grad(o3, (q, k), torch.randn(1, 1, 2, 4))
    print(be, "out[1]", o[0, 0, 1].tolist(), "| dv[:,0]", dv[0, 0, :, 0].tolist(), "| dq[1]", dq[0, 0, 1].tolist())
