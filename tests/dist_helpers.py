"""Multi-process helpers for the sharding tests: gloo on 127.0.0.1, CPU, tiny shapes.

``run_world(worker, world, *args)`` spawns ``world`` processes running ``worker(rank, world, port,
out_dir, *args)`` and returns what rank 0 saved. The model is a bag of parameters with shapes that
split unevenly over 2 and 3 ranks (7 rows -> 4+3 and 3+3+1; 2 rows on 3 ranks leaves one rank
empty; a 3-D tensor sharded on its leading dim), and a loss that is a mean over the batch, so a
data-parallel run on W slices of one global batch must equal a single-process run on all of it.
"""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = [(7, 5), (5,), (3, 4, 6), (2, 9), (11,), (6, 10)]
GLOBAL_BATCH = 6
STEPS = 5
TOL = 1e-5

# (case id, optimizer name, hyperparameters, fused backward)
CASES = {
    "adafactor": ("adafactor", dict(), False),
    "adafactor_b1_wd": ("adafactor", dict(beta1=0.9, weight_decay=0.1, lr=3e-2, relative_step=False), False),
    "came": ("came", dict(lr=1e-2, weight_decay=0.01), False),
    "adalomo": ("adalomo", dict(lr=3e-2), False),
    "adalomo_fused": ("adalomo", dict(lr=3e-2), True),
    "adalomo_clip": ("adalomo", dict(lr=3e-2, clip_grad_norm=0.5, weight_decay=0.1), False),
    "lomo": ("lomo", dict(lr=3e-2), False),
    "lomo_fused": ("lomo", dict(lr=3e-2), True),
    # Adapprox at a 10x smaller lr than the others: its update amplifies round-off (entries of V
    # below the fp32 resolution of the low-rank product Q U^T get a noisy Vhat), so even DDP,
    # which runs the unchanged single-process code on all-reduced gradients, differs from the
    # single process by 1.1e-5 at lr=1e-2, W=3. Differences scale with lr; a real error in the
    # sharded path moves parameters by the size of the update (~2e-3 here), 100x the tolerance.
    "adapprox": ("adapprox", dict(lr=1e-3), False),
    # Low rank (truncation matters), cold sketches every step (12 product rounds), the options.
    "adapprox_k2_cold": ("adapprox", dict(lr=1e-3, k_max=2, warm_start=False, bias_correction=True,
                                          weight_decay=0.1, betas=(0.9, 0.99)), False),
    # Sketches every 3rd step, the projection onto the kept basis in between (one product round).
    "adapprox_resketch3": ("adapprox", dict(lr=1e-3, resketch_every=3), False),
    # The sync-free path (foreach=True) against the reference path's single process: whole
    # parameters (DDP) take it, sharded ones (FSDP2, ZeRO) keep their phased step with the flag.
    "came_foreach": ("came", dict(lr=1e-2, weight_decay=0.01, foreach=True), False),
    "adalomo_fused_foreach": ("adalomo", dict(lr=3e-2, foreach=True), True),
}


class BagModel(torch.nn.Module):
    """Parameters of SHAPES; loss = mean over the batch of sum_k (sum(tanh(p_k) * x_k))^2 / numel_k."""

    def __init__(self, seed: int = 0, shapes=SHAPES):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes])

    def forward(self, xs):
        loss = 0.0
        for p, x in zip(self.ps, xs):
            t = (torch.tanh(p).unsqueeze(0) * x).flatten(1).sum(1)
            loss = loss + (t * t).mean() / p.numel()
        return loss


def batch(step: int, shapes=SHAPES, size: int = GLOBAL_BATCH):
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn((size,) + tuple(s), generator=gen) for s in shapes]


def local_batch(step: int, rank: int, world: int, shapes=SHAPES):
    per = GLOBAL_BATCH // world
    return [x[rank * per:(rank + 1) * per] for x in batch(step, shapes)]


def reference(case: str, steps: int = STEPS, shapes=SHAPES) -> list[torch.Tensor]:
    """The single-process run on the whole global batch (memopt's plain path)."""
    import memopt

    name, hp, fused = CASES[case]
    hp = dict(hp, foreach=False)
    model = BagModel(0, shapes)
    opt = memopt.create_optimizer(name, model.parameters(), **hp)
    for step in range(steps):
        loss = model(batch(step, shapes))
        optimizer_step(opt, loss, fused)
    return [p.detach().clone() for p in model.ps]


def optimizer_step(opt, loss, fused: bool) -> None:
    """One step: memopt's fused backward (updates inside backward), or backward + step."""
    if fused:
        opt.fused_backward(loss)
    else:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")


def _entry(rank, worker, world, port, out_dir, args):
    init_gloo(rank, world, port)
    try:
        result = worker(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_world(worker, world: int, *args):
    """Run ``worker(rank, world, *args)`` on ``world`` gloo ranks; returns every rank's result."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(worker, world, free_port(), out_dir, args), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def max_abs_diff(xs, ys) -> float:
    return max(float((x.double() - y.double()).abs().max()) if x.numel() else 0.0 for x, y in zip(xs, ys))


def moved(xs, seed: int = 0) -> float:
    """How far the parameters moved from their initial values (the run really did something)."""
    init = BagModel(seed).ps
    return max(float((x - p.detach()).abs().max()) for x, p in zip(xs, init))


# -- workers ---------------------------------------------------------------------------------
def fsdp2_worker(rank, world, cases, steps=STEPS):
    import memopt
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for case in cases:
        name, hp, fused = CASES[case]
        model = BagModel(0)
        fully_shard(model, mesh=mesh)
        opt = memopt.create_optimizer(name, model.parameters(), **hp)
        from memopt.sharding import COMM_STATS, reset_comm_stats

        reset_comm_stats()
        for step in range(steps):
            loss = model(local_batch(step, rank, world))
            optimizer_step(opt, loss, fused)
        out[case + ":collectives"] = COMM_STATS["collectives"]
        out[case] = [p.full_tensor().detach().clone() for p in model.ps]
        out[case + ":state_bytes"] = opt.state_bytes()
    return out


def ddp_worker(rank, world, cases, steps=STEPS):
    import memopt
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for case in cases:
        name, hp, fused = CASES[case]
        model = BagModel(0)
        ddp = DDP(model)
        opt = memopt.create_optimizer(name, model.parameters(), **hp)
        if fused:
            from memopt.integrations.ddp import register_fused_backward

            register_fused_backward(ddp, opt)
        for step in range(steps):
            loss = ddp(local_batch(step, rank, world))
            if fused:
                from memopt.integrations.ddp import fused_backward

                fused_backward(ddp, opt, loss)
                assert all(p.grad is None for p in model.parameters())
            else:
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        out[case] = [p.detach().clone() for p in model.ps]
    return out


def deepspeed_config(stage: int, world: int, bf16: bool = False) -> dict:
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; the reference does not clip
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def no_deepspeed_op_builds():
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op (1-5 minutes on a
    fresh machine): with the op marked incompatible, deepspeed.comm uses plain torch.distributed."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_worker(rank, world, stages, cases, steps=STEPS, bf16=False, plain=False):
    no_deepspeed_op_builds()
    import deepspeed

    import memopt
    from memopt.integrations.deepspeed import initialize

    out = {}
    for stage in stages:
        for case in cases:
            name, hp, fused = CASES[case]
            model = BagModel(0)
            if plain:
                opt = memopt.create_optimizer(name, model.parameters(), **hp)
                cfg = dict(deepspeed_config(stage, world, bf16), zero_allow_untested_optimizer=True)
                engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            else:
                engine, *_ = initialize(model=model, optimizer=name, optimizer_params=hp,
                                        config=deepspeed_config(stage, world, bf16))
            try:
                for step in range(steps):
                    xs = local_batch(step, rank, world)
                    if bf16:
                        xs = [x.bfloat16() for x in xs]
                    loss = engine(xs)
                    engine.backward(loss)
                    engine.step()
            except RuntimeError as e:
                if not plain:
                    raise
                out[(stage, case)] = str(e)
                continue
            from deepspeed.utils import safe_get_full_fp32_param

            full = [safe_get_full_fp32_param(p) for p in engine.module.ps]
            out[(stage, case)] = [(f if f is not None else p).detach().float().clone() for f, p in zip(full, engine.module.ps)]
            client = engine.optimizer if isinstance(engine.optimizer, memopt.MemoptOptimizer) else engine.optimizer.optimizer
            out[(stage, case, "state_bytes")] = client.state_bytes()
            out[(stage, case, "bound")] = len(client.fragments)
            engine.destroy() if hasattr(engine, "destroy") else None
    return out


def combo_worker(rank, world, jobs):
    """Several (worker, args) jobs in the same processes (spawning costs more than the jobs)."""
    out = {}
    for worker, args in jobs:
        out.update(worker(rank, world, *args))
    return out


# -- checkpoints across world sizes ------------------------------------------------------------
def train_steps(model, opt, steps, rank=0, world=1, fused=False):
    for step in steps:
        xs = batch(step) if world == 1 else local_batch(step, rank, world)
        loss = model(xs)
        optimizer_step(opt, loss, fused)


def load_full_params(model, full_params):
    """Copy full tensors into (possibly FSDP2-sharded) parameters."""
    import torch.distributed.tensor as dt

    from memopt.sharding import dtensor_layout

    with torch.no_grad():
        for p, full in zip(model.ps, full_params):
            if isinstance(p, dt.DTensor):
                local, layout = dtensor_layout(p)
                local.copy_(layout.local_of(full).view(local.shape))
            else:
                p.copy_(full)


def fsdp2_checkpoint_worker(rank, world, cases, saved=None, split=3, steps=STEPS):
    """``saved`` None: train ``split`` steps and return {case: (full params, full optimizer state)}.
    Otherwise load ``saved[case]`` and train the remaining steps; return {case: full params}."""
    import memopt
    from memopt.checkpoint import full_state_dict, load_full_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for case in cases:
        name, hp, fused = CASES[case]
        model = BagModel(0)
        fully_shard(model, mesh=mesh)
        opt = memopt.create_optimizer(name, model.parameters(), **hp)
        if saved is None:
            train_steps(model, opt, range(split), rank, world, fused)
            out[case] = ([p.full_tensor().detach().clone() for p in model.ps], full_state_dict(opt, model))
        else:
            params, state = saved[case]
            load_full_params(model, params)
            load_full_state_dict(opt, state, model)
            train_steps(model, opt, range(split, steps), rank, world, fused)
            out[case] = [p.full_tensor().detach().clone() for p in model.ps]
    return out


def deepspeed_checkpoint_worker(rank, world, stage, cases, split=3):
    """Train ``split`` steps under ZeRO-``stage``; return {case: (full params, full optimizer state)}."""
    no_deepspeed_op_builds()
    from deepspeed.utils import safe_get_full_fp32_param

    import memopt
    from memopt.checkpoint import full_state_dict
    from memopt.integrations.deepspeed import initialize

    out = {}
    for case in cases:
        name, hp, _ = CASES[case]
        engine, opt, *_ = initialize(model=BagModel(0), optimizer=name, optimizer_params=hp,
                                     config=deepspeed_config(stage, world))
        for step in range(split):
            loss = engine(local_batch(step, rank, world))
            engine.backward(loss)
            engine.step()
        client = opt if isinstance(opt, memopt.MemoptOptimizer) else opt.optimizer
        params = [safe_get_full_fp32_param(p).detach().clone() for p in engine.module.ps]
        out[case] = (params, full_state_dict(client, engine.module))
    return out


def deepspeed_capture_worker(rank, world, stages, cases, steps=3, bf16=True):
    """Train under ZeRO-``stage`` (bf16 by default) and record, at every client step, the full
    fp32 master parameters before and after it and the full gradients it was given, gathered
    from the bound fragments: {("bf16", stage, case): [ {name: (before, grad, after)} per step ]}.

    In bf16 the forward/backward runs in bf16, so the trajectory is not comparable with an fp32
    single process; what must hold is that each sharded update equals the single-process update
    of the same full master weights with the same full gradients (``replay_single``)."""
    no_deepspeed_op_builds()
    import memopt
    from memopt.integrations.deepspeed import initialize

    out = {}
    for stage in stages:
        for case in cases:
            name, hp, _ = CASES[case]
            engine, opt, *_ = initialize(model=BagModel(0), optimizer=name, optimizer_params=hp,
                                         config=deepspeed_config(stage, world, bf16))
            client = opt if isinstance(opt, memopt.MemoptOptimizer) else opt.optimizer
            records = []
            plain_step = client.step

            def gathered(with_grad):
                got = {}
                for flat, frags in client.fragments.items():
                    if flat.grad is None:
                        continue
                    for fname, off, layout in frags:
                        w = layout.gather_full(flat.detach()[off:off + layout.length].float())
                        g = layout.gather_full(flat.grad[off:off + layout.length].float()) if with_grad else None
                        got[fname] = (w, g)
                return got

            def recording_step(closure=None):
                before = gathered(True)
                result = plain_step(closure)
                after = gathered(False)
                records.append({k: (before[k][0], before[k][1], after[k][0]) for k in before})
                return result

            client.step = recording_step
            for step in range(steps):
                xs = local_batch(step, rank, world)
                loss = engine([x.bfloat16() for x in xs] if bf16 else xs)
                engine.backward(loss)
                engine.step()
            # ZeRO-1/2 step once per parameter group: merge the records of one engine step.
            per_step = len(records) // steps
            out[("bf16" if bf16 else "fp32", stage, case)] = [
                {k: v for rec in records[i * per_step:(i + 1) * per_step] for k, v in rec.items()} for i in range(steps)
            ]
            engine.destroy() if hasattr(engine, "destroy") else None
    return out


def replay_single(case, records, names):
    """Max abs difference between the recorded sharded updates and a single-process optimizer
    (fp32, full tensors, state carried across steps) given the same weights and gradients."""
    import memopt

    name, hp, _ = CASES[case]
    params = [torch.nn.Parameter(records[0][n][0].clone()) for n in names]
    opt = memopt.create_optimizer(name, params, **hp)
    worst = 0.0
    for rec in records:
        with torch.no_grad():
            for p, n in zip(params, names):
                p.copy_(rec[n][0])
                p.grad = rec[n][1].clone()
        opt.step()
        worst = max(worst, max_abs_diff([p.detach() for p in params], [rec[n][2] for n in names]))
    return worst


def torch_optimizer_state_bytes_worker(rank, world):
    """memopt.base.optimizer_state_bytes of torch AdamW under FSDP2 (DTensor states): this rank's bytes."""
    from torch.distributed.fsdp import fully_shard

    from memopt.base import optimizer_state_bytes

    model = torch.nn.Linear(8, 6)  # 6 rows: 3 per rank at W = 2
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return optimizer_state_bytes(opt)
