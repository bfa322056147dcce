"""One 64-channel 7x7 layer at batch 1 (channels_last): the Kronecker layer on a channel path and on
the weight path against the bare convolutions they run; python layer_overhead.py."""
import torch, torch.nn as nn, torch.nn.functional as F
from gkpd.layers import KroneckerConv2d
from gkpd.timing import time_interleaved
torch.set_num_threads(2)
torch.manual_seed(0)
conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
x = torch.randn(1, 64, 7, 7).contiguous(memory_format=torch.channels_last)
k = KroneckerConv2d.from_dense(conv, a_shape=(1, 64, 1, 1), rank=11).eval()
k.path = "a_first_channels"; k = k.to(memory_format=torch.channels_last)
kw = KroneckerConv2d.from_dense(conv, a_shape=(1, 64, 1, 1), rank=11).eval()
kw.path = "weight"; kw = kw.to(memory_format=torch.channels_last)
with torch.no_grad():
    (w1, g1), (w2, g2) = k._derived_for(x, "a_first_channels", lambda: k._channel_stages("a_first_channels"))
    W = kw.reconstruct_weight().contiguous(memory_format=torch.channels_last)
def two(t):
    return F.conv2d(F.conv2d(t, w1), w2, None, 1, 1)
calls = {"kron_chan": lambda: k(x), "bare_two": lambda: two(x), "kron_weight": lambda: kw(x),
         "bare_conv": lambda: F.conv2d(x, W, None, 1, 1), "nn_conv": lambda: conv(x)}
for _ in range(3):
    r = time_interleaved(calls, rounds=3000, warmup=50)
    print("  ".join(f"{k} {v*1e6:.1f}" for k, v in r.items()))
