"""Fast paths for the experts' computation, behind `finemoe.nn.experts.Experts.kernel` (one seam).

Each is tested against `Experts.reference`:
- `dispatch`: where each routed slot's token comes from and how it returns; padding into buckets;
- `expert_mm`: the two expert matmuls in each slot layout, with their backward;
- `cpu_fused`: fused Expert Choice kernels for fp32 CPU (C++ in `csrc/`, built on first use);
- `cpu_matmul`: the opt-in oneDNN path for fp32 CPU linear maps;
- `paths`: the default kernel, which picks among them.
"""
