"""Run as: python ../speed_replay/ab/ab_make.py DIR; python THIS.py DIR (DIR/latency5_b1: a batch-1 latency plan of the 5x ResNet-32)."""
import torch, gkpd, copy, time, sys
import torch.nn as nn
import torch.nn.functional as F
from gkpd.models.pretrained import load_pretrained
import gkpd.runtime
torch.set_num_threads(2); gkpd.runtime.keep_freed_memory()
dense = load_pretrained("resnet32_fashion_mnist").eval().to(memory_format=torch.channels_last)
m = gkpd.load(sys.argv[1] + "/latency5_b1", copy.deepcopy(load_pretrained("resnet32_fashion_mnist"))).eval()
x = torch.randn(1, 1, 28, 28); xl = x.contiguous(memory_format=torch.channels_last)
class Two(nn.Module):
    def __init__(s, w1, w2, p):
        super().__init__(); s.w1, s.w2, s.p = w1, w2, p
    def forward(s, x):
        p = s.p
        return F.conv2d(F.conv2d(x, s.w1, None, p.s1, p.pad1, p.dil1), s.w2, None, p.s2, p.pad2, p.dil2)
ideal = copy.deepcopy(m)
with torch.no_grad(): m(x)
n_two = 0
for name, mod in list(ideal.named_modules()):
    for cn, child in list(mod.named_children()):
        if isinstance(child, gkpd.layers.base.KroneckerLayer):
            path = child.resolve_path((1, child.in_channels, 8, 8))
            if path in ("a_first_channels",) :
                (w1, g1), (w2, g2) = child._channel_stages(path)
                if g1 == 1 and g2 == 1 and child.bias is None:
                    setattr(mod, cn, Two(w1.detach().contiguous(memory_format=torch.channels_last), w2.detach().contiguous(memory_format=torch.channels_last), child._plans["a_first"])); n_two += 1
print("replaced", n_two)
with torch.no_grad():
    print((ideal(xl) - m(x)).abs().max())
def t(f, n=200):
    for _ in range(20): f()
    s=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-s)/n*1e3
res = {}
with torch.no_grad():
    for r in range(6):
        for k, f in (("dense", lambda: dense(xl)), ("gkpd", lambda: m(x)), ("gkpd_cl_in", lambda: m(xl)), ("ideal", lambda: ideal(xl))):
            res.setdefault(k, []).append(t(f))
for k, v in res.items(): print(k, [round(a, 2) for a in v])
from torch.profiler import profile, ProfilerActivity
with torch.no_grad():
    for name, f in (("dense", lambda: dense(xl)), ("ideal", lambda: ideal(xl))):
        for _ in range(50): f()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
            for _ in range(100): f()
        print(name); print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=30, max_shapes_column_width=70))
