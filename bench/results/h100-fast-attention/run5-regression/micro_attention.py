import torch, time
from adaspec_worker.decode.tree_attention import available, span, tree_attention
import adaspec_worker.decode.tree_attention as ta
from adaspec_worker.decode.model import attention_mask
from adaspec_worker.decode.layers import gqa_mask
assert available()
dev = "cuda"
def bench(fn, n=50):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): g.replay()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n / 10 * 1e6
for B, T, S, live in [(1, 1, 1024, 500), (16, 1, 1024, 500), (64, 1, 1024, 500), (64, 30, 1024, 500), (64, 1, 2048, 900)]:
    L, H, Hkv, D = 12, 6, 2, 64
    kvfull = torch.randn(B, S, L, 2, Hkv, D, device=dev, dtype=torch.bfloat16)
    kv = kvfull[:, :, 3]
    q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((B,), live, device=dev)
    tm = torch.ones(B, T, T, dtype=torch.bool, device=dev).tril()
    sp = span(lens, tm)
    t_k = bench(lambda: tree_attention(q, kv, sp, None))
    mask = gqa_mask(attention_mask(lens, tm, S), H // Hkv, torch.bfloat16)
    def sdpa():
        qg = q.view(B, T, Hkv, H // Hkv, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T * (H // Hkv), D)
        return torch.nn.functional.scaled_dot_product_attention(qg, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), attn_mask=mask)
    t_s = bench(sdpa)
    print(f"B={B} T={T} S={S} live={live}: kernel {t_k:.1f} us, sdpa(eager ops) {t_s:.1f} us", flush=True)
