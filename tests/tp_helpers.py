"""Tensor-parallel (TP) x data-parallel (DP) runs of a bag of parameters, for memopt's 2-D layouts.

Each parameter of ``TP_SHAPES`` is split over the TP group as megatron-core splits its layers:
rows (dim 0: column-parallel weights, their biases, a vocab-parallel embedding), columns (dim 1:
row-parallel weights), or not at all (layer norms). The loss is ``dist_helpers.BagModel``'s: per
parameter, a batch mean of (sum(tanh(p) * x))^2 / numel, where a split parameter's sum is a TP
all-reduce of the slices' partial sums (backward: identity, like megatron's reduce-from-TP
region), so every rank's gradient is exactly its slice of the full gradient. A run at TP x DP
therefore must give the single-process parameters of ``dist_helpers.reference``.

Ranks: TP groups are consecutive ranks (megatron's order): rank = dp_rank * TP + tp_rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import dist_helpers as dh

# (full shape, split dim or None); every split size divides by 2, and the DP=2 shards of the
# slices are uneven (3 rows -> 2 + 1).
TP_LAYOUT = [((6, 5), 0), ((4, 6), 1), ((8,), 0), ((3, 4), None), ((5,), None), ((4, 10), 1), ((2, 3, 4), None)]
TP_SHAPES = [s for s, _ in TP_LAYOUT]


class _SumOverTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class TPBagModel(torch.nn.Module):
    """This TP rank's slices of ``BagModel(seed, TP_SHAPES)``."""

    def __init__(self, tp_rank: int, tp: int, tp_group, seed: int = 0):
        super().__init__()
        full = dh.BagModel(seed, TP_SHAPES).ps
        self.splits = [d for _, d in TP_LAYOUT]
        self.numels = [p.numel() for p in full]
        self.tp_rank, self.tp, self.tp_group = tp_rank, tp, tp_group
        self.ps = torch.nn.ParameterList(
            [torch.nn.Parameter(self.slice(p.detach(), d).clone()) for p, d in zip(full, self.splits)])

    def slice(self, t: torch.Tensor, dim, batch_dims: int = 0) -> torch.Tensor:
        if dim is None:
            return t
        return t.chunk(self.tp, dim=dim + batch_dims)[self.tp_rank]

    def forward(self, xs):
        loss = 0.0
        for p, x, d, numel in zip(self.ps, xs, self.splits, self.numels):
            t = (torch.tanh(p).unsqueeze(0) * self.slice(x, d, batch_dims=1)).flatten(1).sum(1)
            if d is not None:
                t = _SumOverTP.apply(t, self.tp_group)
            loss = loss + (t * t).mean() / numel
        return loss

    def mark(self, params, tp_dp_group) -> None:
        import memopt

        for p, d in zip(params, self.splits):
            if d is not None:
                memopt.mark_tensor_parallel(p, d, self.tp_rank, self.tp, self.tp_group, tp_dp_group=tp_dp_group)

    def full_params(self, locals_) -> list[torch.Tensor]:
        """The full tensors from every TP rank's slices (a collective over the TP group)."""
        out = []
        for t, d in zip(locals_, self.splits):
            t = t.detach().float().contiguous()
            if d is None:
                out.append(t.clone())
                continue
            parts = [torch.empty_like(t) for _ in range(self.tp)]
            dist.all_gather(parts, t, group=self.tp_group)
            out.append(torch.cat(parts, dim=d))
        return out


def mesh_groups(world: int, tp: int):
    """(device mesh (dp, tp), tp rank, dp rank, TP group, DP group, TP x DP group)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    rank = dist.get_rank()
    return mesh, rank % tp, rank // tp, mesh["tp"].get_group(), mesh["dp"].get_group(), dist.group.WORLD


def dp_batch(step: int, dp_rank: int, dp: int):
    per = dh.GLOBAL_BATCH // dp
    return [x[dp_rank * per:(dp_rank + 1) * per] for x in dh.batch(step, TP_SHAPES)]


def whole_worker(rank, world, tp, cases, steps=dh.STEPS, tag="whole"):
    """TP slices as plain tensors; DDP over the DP group when DP > 1 (fused: its comm hook)."""
    import memopt
    from memopt.checkpoint import full_state_dict
    from memopt.sharding import COMM_STATS, reset_comm_stats

    _, tp_rank, dp_rank, tp_group, dp_group, tp_dp = mesh_groups(world, tp)
    dp = world // tp
    out = {}
    for case in cases:
        name, hp, fused = dh.CASES[case]
        model = TPBagModel(tp_rank, tp, tp_group)
        model.mark(model.ps, tp_dp)
        opt = memopt.create_optimizer(name, model.parameters(), **hp)
        ddp = None
        if dp > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp = DDP(model, process_group=dp_group)
            if fused:
                from memopt.integrations.ddp import register_fused_backward

                register_fused_backward(ddp, opt)
        reset_comm_stats()
        for step in range(steps):
            xs = dp_batch(step, dp_rank, dp)
            if ddp is not None and fused:
                from memopt.integrations.ddp import fused_backward

                fused_backward(ddp, opt, ddp(xs))
            else:
                dh.optimizer_step(opt, (ddp or model)(xs), fused)
        out[(tag, case, "collectives")] = COMM_STATS["collectives"]
        out[(tag, case)] = model.full_params(model.ps)
        out[(tag, case, "full_state")] = full_state_dict(opt, model)
    return out


def fsdp2_worker(rank, world, tp, cases, steps=dh.STEPS, tag="fsdp2"):
    """TP slices sharded Shard(0) over the DP dimension of a (dp, tp) mesh (torchtitan style)."""
    import memopt
    from torch.distributed.fsdp import fully_shard

    mesh, tp_rank, dp_rank, tp_group, _, tp_dp = mesh_groups(world, tp)
    dp = world // tp
    out = {}
    for case in cases:
        name, hp, fused = dh.CASES[case]
        model = TPBagModel(tp_rank, tp, tp_group)
        fully_shard(model, mesh=mesh["dp"])
        model.mark(list(model.ps), tp_dp)  # after fully_shard, which replaces the parameters
        opt = memopt.create_optimizer(name, model.parameters(), **hp)
        for step in range(steps):
            dh.optimizer_step(opt, model(dp_batch(step, dp_rank, dp)), fused)
        out[(tag, case)] = model.full_params([p.full_tensor() for p in model.ps])
        out[(tag, case, "state_bytes")] = opt.state_bytes()
    return out


class MeshMPU:
    """The model-parallel unit DeepSpeed asks for (``deepspeed.initialize(mpu=...)``): TP groups
    of consecutive ranks, DP groups across them, as megatron-core's parallel_state has them."""

    def __init__(self, tp_group, dp_group):
        self.tp_group, self.dp_group = tp_group, dp_group

    def get_model_parallel_group(self):
        return self.tp_group

    def get_model_parallel_rank(self):
        return dist.get_rank(self.tp_group)

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.tp_group)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_rank() - self.get_model_parallel_rank()

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self):
        return dist.get_rank(self.dp_group)

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.dp_group)


def deepspeed_worker(rank, world, tp, stages, cases, steps=dh.STEPS, tag="zero"):
    """TP slices under DeepSpeed ZeRO over the DP group (memopt binds each flat partition)."""
    dh.no_deepspeed_op_builds()
    from deepspeed.utils import safe_get_full_fp32_param

    from memopt.integrations.deepspeed import initialize

    _, tp_rank, dp_rank, tp_group, dp_group, tp_dp = mesh_groups(world, tp)
    dp = world // tp
    out = {}
    for stage in stages:
        for case in cases:
            name, hp, fused = dh.CASES[case]
            if fused:
                continue  # DeepSpeed runs its own backward: memopt's fused mode does not apply
            model = TPBagModel(tp_rank, tp, tp_group)
            model.mark(model.ps, tp_dp)  # DeepSpeed keeps the module's parameter objects
            cfg = dict(dh.deepspeed_config(stage, dp), train_batch_size=dh.GLOBAL_BATCH)
            engine, *_ = initialize(model=model, optimizer=name, optimizer_params=hp, config=cfg,
                                    mpu=MeshMPU(tp_group, dp_group))
            for step in range(steps):
                loss = engine(dp_batch(step, dp_rank, dp))
                engine.backward(loss)
                engine.step()
            full = [safe_get_full_fp32_param(p) for p in engine.module.ps]
            out[(f"{tag}{stage}", case)] = model.full_params(full)
            engine.destroy() if hasattr(engine, "destroy") else None
    return out


def resume_worker(rank, world, tp, cases, saved=None, split=3, steps=dh.STEPS):
    """Resume across TP sizes through memopt's name-keyed full state (TP slices as plain tensors,
    DP = world / tp replicated). ``saved`` None: run steps [0, split) and return {case: (full
    params, full optimizer state)}; else start from ``saved[case]`` and run [split, steps),
    returning {case: full params}."""
    import memopt
    from memopt.checkpoint import full_state_dict, load_full_state_dict

    _, tp_rank, dp_rank, tp_group, _, tp_dp = mesh_groups(world, tp)
    if world != tp:
        raise ValueError("resume_worker runs DP = 1")
    out = {}
    for case in cases:
        name, hp, fused = dh.CASES[case]
        model = TPBagModel(tp_rank, tp, tp_group)
        model.mark(model.ps, tp_dp)
        opt = memopt.create_optimizer(name, model.parameters(), **hp)
        todo = range(split) if saved is None else range(split, steps)
        if saved is not None:
            params, state = saved[case]
            with torch.no_grad():
                for p, full, d in zip(model.ps, params, model.splits):
                    p.copy_(model.slice(full, d))
            load_full_state_dict(opt, state, model)
        for step in todo:
            dh.optimizer_step(opt, model(dp_batch(step, 0, 1)), fused)
        params = model.full_params(model.ps)
        out[case] = (params, full_state_dict(opt, model)) if saved is None else params
    return out
