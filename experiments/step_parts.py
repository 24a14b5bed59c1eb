"""The parts of the TopK training step timed alone at the standard crosscoder's shapes (batch 4096, 4 x 576 inputs,
9,216 latents, k 32), median of 5 after a warm-up, ms: the encoder GEMM in its layouts and into a reused buffer, the
score pass fresh vs in place, TopK, the encoder weight gradient by a CSR ``addmm`` (session 8) vs ``embedding_bag``,
the decode and its backward parts, fused Adam and clipping. Session 9 used it to choose the step's changes; its
output is ``experiments/results/step_parts_s9.txt``. Run: ``python experiments/step_parts.py`` (random data).
"""
import time, statistics, torch, torch.nn.functional as F_
torch.manual_seed(0)
B, I, F, K = 4096, 2304, 9216, 32
def med(fn, n=5):
    fn(); ts=[]
    for _ in range(n):
        t=time.perf_counter(); fn(); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e3
x = torch.randn(B, I); W_FI = torch.randn(F, I) / 48; W_IF = W_FI.T.contiguous()
print("ref x@W_IF", med(lambda: x @ W_IF))
print("mm x@W_FI.T", med(lambda: x @ W_FI.T))
print("bmm", med(lambda: torch.bmm(x[None], W_FI[None].transpose(1, 2))))
buf = torch.empty(B, F)
print("mm out= reused", med(lambda: torch.mm(x, W_FI.T, out=buf)))
b = torch.randn(F); s = torch.rand(F) + 0.5
xw = x @ W_FI.T
print("addcmul new", med(lambda: torch.addcmul((b*s)[None], xw, s[None])))
print("addcmul inplace", med(lambda: torch.addcmul((b*s)[None], xw, s[None], out=xw)))
sc = torch.addcmul((b*s)[None], xw, s[None])
print("topk", med(lambda: sc.topk(K, dim=-1, sorted=False)))
idx = sc.topk(K, dim=-1, sorted=False).indices
g = torch.randn(B, K)
# encoder weight grad: CSR addmm (current) vs embedding_bag by feature
rows = torch.arange(B)[:, None].expand_as(idx).reshape(-1); cols = idx.reshape(-1); vals = g.reshape(-1)
def csr():  # session 8's encoder gradient: a CSR matrix [F, B] (columns sorted) times x
    order = (cols * B + rows).argsort(stable=True)
    crow = torch.zeros(F + 1, dtype=torch.long); crow[1:] = torch.bincount(cols, minlength=F).cumsum(0)
    S = torch.sparse_csr_tensor(crow, rows[order], vals[order], (F, B), check_invariants=False)
    out = W_FI.new_empty(F, I)
    torch.addmm(out, S, x, beta=0, out=out); return out
def ebag():
    order = cols.argsort(stable=True)
    offs = torch.zeros(F, dtype=torch.long); offs[1:] = torch.bincount(cols, minlength=F).cumsum(0)[:-1]
    return F_.embedding_bag(rows[order], x, offs, mode="sum", per_sample_weights=vals[order])
print("gW csr", med(csr)); print("gW ebag", med(ebag))
print("maxdiff", (csr() - ebag()).abs().max().item())
# decode and its backward
Wd = torch.randn(F, I) / 48
v = torch.rand(B, K)
print("decode ebag fwd", med(lambda: F_.embedding_bag(idx, Wd, mode="sum", per_sample_weights=v)))
Wdp = Wd.clone().requires_grad_(); vp = v.clone().requires_grad_()
go = torch.randn(B, I)
def dec_bwd():
    out = F_.embedding_bag(idx, Wdp, mode="sum", per_sample_weights=vp)
    Wdp.grad = None; vp.grad = None
    out.backward(go)
print("decode fwd+bwd autograd", med(dec_bwd))
def gWd_ebag():
    order = cols.argsort(stable=True)
    offs = torch.zeros(F, dtype=torch.long); offs[1:] = torch.bincount(cols, minlength=F).cumsum(0)[:-1]
    return F_.embedding_bag(rows[order], go, offs, mode="sum", per_sample_weights=v.reshape(-1)[order])
print("gWdec ebag", med(gWd_ebag))
def gv_chunk(c=256):
    out = torch.empty(B, K)
    for s0 in range(0, B, c):
        out[s0:s0+c] = torch.bmm(Wd[idx[s0:s0+c]], go[s0:s0+c, :, None])[..., 0]
    return out
print("gvals chunked gather", med(gv_chunk))
csr_mask = torch.sparse_csr_tensor(torch.arange(0, B*K+1, K), idx.reshape(-1), torch.ones(B*K), (B, F))
try:
    print("gvals sampled_addmm", med(lambda: torch.sparse.sampled_addmm(csr_mask, go, Wd.T, beta=0)))
except Exception as e: print("sampled_addmm", e)
params = [torch.randn(F, I, requires_grad=True), torch.randn(F, 4, 576, requires_grad=True)]
for p in params: p.grad = torch.randn_like(p)
opt = torch.optim.Adam(params, lr=1e-3, fused=True)
print("adam fused", med(lambda: opt.step()))
print("clip", med(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)))
print("norm only", med(lambda: torch.nn.utils.get_total_norm([p.grad for p in params])))
def adam_scaled():
    n = torch.nn.utils.get_total_norm([p.grad for p in params])
    opt.grad_scale = (n / 1.0).clamp(min=1.0); opt.step()
print("adam+grad_scale", med(adam_scaled))
