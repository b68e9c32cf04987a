"""Run under torchrun: one Token Choice MoE layer with its experts split over the ranks (ep = world),
on the grouped-GEMM path, against the same layer whole on every rank. Prints one JSON line on rank 0.

Usage: ep_grouped_worker.py DEVICE DTYPE  (cpu float32 under gloo, cuda bfloat16 under NCCL)
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from finemoe.config import ModelConfig
from finemoe.nn.moe import MoE
from finemoe.parallel import expert_parallel

device_type, dtype = sys.argv[1], getattr(torch, sys.argv[2])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
if device_type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
cfg = ModelConfig(vocab_size=64, seq_len=8, d_model=32, n_blocks=1, head_dim=16, ffn="moe")
cfg = cfg.replace(expansion_rate=2, granularity=4, routing="tc", top_k=2)
torch.manual_seed(0)
whole = MoE(cfg).to(device, dtype)
split = MoE(cfg).to(device, dtype)
split.load_state_dict(whole.state_dict())
for m in (whole, split):
    m.experts.use_grouped_mm = True
grouped_calls = [0]
grouped = expert_parallel.ExpertParallel._grouped


def counted(*args):
    grouped_calls[0] += 1
    return grouped(*args)


expert_parallel.ExpertParallel._grouped = counted
mesh = expert_parallel.mesh_for(world, world, device)
expert_parallel.shard_experts(split, mesh)
torch.manual_seed(1 + rank)  # each rank its own tokens
x = torch.randn(3, cfg.seq_len, cfg.d_model, device=device, dtype=dtype)
g = torch.randn_like(x)
xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
ya, yb = whole(xa)[0], split(xb)[0]
(ya * g).sum().backward()
(yb * g).sum().backward()


def expert_grad_error(name: str) -> float:
    """The whole layer's expert gradient sums every rank's tokens: all-reduced, its slice of this rank's
    experts against the shard's gradient."""
    whole_grad = getattr(whole.experts, name).grad
    dist.all_reduce(whole_grad)
    mine = whole_grad.view(world, -1, *whole_grad.shape[1:])[rank]
    return ((mine - getattr(split.experts, name).grad.to_local()).abs().max() / mine.abs().max()).item()


errs = {
    "y": (ya - yb).abs().max().item() / ya.abs().max().item(),
    "dx": (xa.grad - xb.grad).abs().max().item() / xa.grad.abs().max().item(),
    "dw1": expert_grad_error("w1"),
    "dw2": expert_grad_error("w2"),
}
worst = torch.tensor(list(errs.values()), device=device, dtype=torch.float32)
dist.all_reduce(worst, op=dist.ReduceOp.MAX)
if rank == 0:
    print(json.dumps(dict(zip(errs, worst.tolist())) | {"grouped_calls": grouped_calls[0]}))
dist.destroy_process_group()
