"""Contextual attention forward+backward: ours (batched, cheap propagation) vs a per-sample loop in the
references' style (unbatched, unchunked, propagation as a 3x3 identity-kernel convolution over the score map).

Batch 8, 64x64x128 features (a 256x256 input), self-attention with per-sample box holes (128x128 image
holes -> 32x32 feature holes). Each variant runs in its own subprocess, alternating, so the peak-RSS figures
are separate; the timing is the median over all repeats. Prints one JSON object.

    .venv/bin/python benchmarks/contextual_attention.py [--rounds 2] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import ContextualAttention  # noqa: E402

B, C, H, W = 8, 128, 64, 64


def loop_attention(f, b, mask, ksize=3, rate=2, fuse_k=3, scale=10.0):
    """The references' structure: a Python loop over samples; per sample unfold the patches, convolve for
    scores, fuse with two identity-kernel convolutions over the (L x L) map, masked softmax, conv_transpose
    paste-back divided by the exact overlap count."""
    Bn, Cn, Hn, Wn = f.shape
    r, k, p = rate, ksize, ksize // 2
    h, w = Hn // r, Wn // r
    L = h * w
    eye = torch.eye(fuse_k, dtype=f.dtype).view(1, 1, fuse_k, fuse_k)
    cnt = F.conv_transpose2d(torch.ones(1, 1, h, w), torch.ones(1, 1, 2 * r, 2 * r), stride=r)
    ys = []
    for i in range(Bn):
        fi, bi, mi = f[i:i + 1], b[i:i + 1], mask[i:i + 1]
        bpad = F.pad(bi, (r // 2, r - r // 2, r // 2, r - r // 2))
        raw = F.unfold(bpad, 2 * r, stride=r).view(Cn, 2 * r, 2 * r, L).permute(3, 0, 1, 2)  # (L, C, 2r, 2r)
        fd, bd = fi[:, :, ::r, ::r], bi[:, :, ::r, ::r]
        wp = F.unfold(bd, k, padding=p).view(Cn, k, k, L).permute(3, 0, 1, 2)  # (L, C, k, k)
        wn = wp / wp.flatten(1).norm(dim=1).clamp_min(1e-4)[:, None, None, None]
        s = F.conv2d(fd, wn, padding=p).view(L, L).t()  # (L_fg, L_bg)
        s = F.conv2d(s.reshape(1, 1, L, L), eye, padding=fuse_k // 2)
        s = s.view(1, h, w, h, w).permute(0, 2, 1, 4, 3).reshape(1, 1, L, L)
        s = F.conv2d(s, eye, padding=fuse_k // 2)
        s = s.view(1, w, h, w, h).permute(0, 2, 1, 4, 3).reshape(L, L)
        valid = (F.max_pool2d(F.max_pool2d(mi, r), k, stride=1, padding=p) < 0.5).view(L)
        attn = torch.softmax((s * scale).masked_fill(~valid, float("-inf")), dim=1)  # (L_fg, L_bg)
        y = F.conv_transpose2d(attn.t().reshape(1, L, h, w), raw, stride=r)
        ys.append((y / cnt)[:, :, r // 2:r // 2 + Hn, r // 2:r // 2 + Wn])
    return torch.cat(ys)


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    mask = torch.zeros(B, 1, H, W)
    for i in range(B):
        t, l = int(torch.randint(0, H - 32, (1,), generator=g)), int(torch.randint(0, W - 32, (1,), generator=g))
        mask[i, :, t:t + 32, l:l + 32] = 1
    return x, mask


def run_variant(variant: str, repeats: int) -> dict:
    x, mask = make_inputs()
    att = ContextualAttention()

    def step():
        xi = x.clone().requires_grad_(True)
        if variant == "ours":
            y, _ = att(xi, xi, mask)
        else:
            y = loop_attention(xi, xi, mask)
        y.square().mean().backward()

    step()  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"times_s": times, "cpu_s": cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="subprocesses per variant (alternating)")
    ap.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes per subprocess")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--variant", choices=["ours", "loop"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, args.repeats)))
        return 0

    # agreement check (forward, once)
    x, mask = make_inputs()
    with torch.no_grad():
        diff = (ContextualAttention()(x, x, mask)[0] - loop_attention(x, x, mask)).abs().max().item()
    results = {"ours": [], "loop": []}
    cpu = {"ours": [], "loop": []}  # process CPU seconds: less sensitive than wall time to a busy machine
    peaks = {"ours": 0.0, "loop": 0.0}
    cmd = [sys.executable, __file__, "--repeats", str(args.repeats)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    for _ in range(args.rounds):
        for variant in ("ours", "loop"):
            out = subprocess.run(cmd + ["--variant", variant], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant] += r["times_s"]
            cpu[variant] += r["cpu_s"]
            peaks[variant] = max(peaks[variant], r["peak_rss_mb"])
    med = {k: statistics.median(v) for k, v in results.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(json.dumps({
        "benchmark": "contextual_attention_fwd_bwd",
        "shape": {"batch": B, "channels": C, "height": H, "width": W},
        "threads": torch.get_num_threads(),
        "ours_median_s": round(med["ours"], 4),
        "loop_median_s": round(med["loop"], 4),
        "ratio_ours_over_loop": round(med["ours"] / med["loop"], 3),
        "goal_ratio": 0.4,
        "ours_median_cpu_s": round(med_cpu["ours"], 4),
        "loop_median_cpu_s": round(med_cpu["loop"], 4),
        "cpu_ratio_ours_over_loop": round(med_cpu["ours"] / med_cpu["loop"], 3),
        "ours_times_s": [round(t, 4) for t in results["ours"]],
        "loop_times_s": [round(t, 4) for t in results["loop"]],
        "ours_peak_rss_mb": round(peaks["ours"], 1),
        "loop_peak_rss_mb": round(peaks["loop"], 1),
        "max_abs_diff_forward": diff,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
