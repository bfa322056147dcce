"""Run as: python ../speed_replay/ab/ab_make.py DIR; python THIS.py DIR (DIR/latency5_b1: a batch-1 latency plan of the 5x ResNet-32)."""
import torch, gkpd, copy, time, sys
from gkpd.models.pretrained import load_pretrained
import gkpd.runtime
gkpd.runtime.keep_freed_memory()
dense = load_pretrained("resnet32_fashion_mnist").eval().to(memory_format=torch.channels_last)
m = gkpd.load(sys.argv[1] + "/latency5_b1", copy.deepcopy(load_pretrained("resnet32_fashion_mnist"))).eval()
x = torch.randn(1, 1, 28, 28); xl = x.contiguous(memory_format=torch.channels_last)
def t(f, n=200):
    for _ in range(20): f()
    s=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-s)/n*1e3
res = {}
with torch.no_grad():
    for r in range(5):
        for th in (1, 2):
            torch.set_num_threads(th)
            for k, f in (("dense", lambda: dense(xl)), ("gkpd", lambda: m(x))):
                res.setdefault((k, th), []).append(t(f))
for k, v in res.items(): print(k, round(sorted(v)[2], 3), [round(a, 2) for a in v])
