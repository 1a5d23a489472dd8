"""Compile memopt's Triton kernels for a CUDA architecture, on a machine without a GPU.

The interpreter tests (tests/memopt/test_triton_kernels.py) check the kernels' numbers, but the
interpreter runs them as numpy and accepts code the Triton compiler refuses (loop-carried type
changes, unsupported ops). This tool runs the backend's wrappers on CPU tensors with every
kernel launch replaced by a recorder, then compiles each recorded launch (its argument types and
constexpr flags, i.e. exactly the variants the wrappers launch) down to a cubin with Triton's
bundled ptxas, for the target architecture (default sm_90: H100/H200). No GPU, no driver.

    python tools/check_triton_compile.py            # one variant per kernel (about a minute)
    python tools/check_triton_compile.py --all      # every variant the wrappers launch
    python tools/check_triton_compile.py --arch 80  # A100

Exit status 0 when everything compiled; 1 with the kernel, its constexprs and the compiler's
first error lines otherwise.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

# The compiler, not the interpreter: Triton reads this when it is imported.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from memopt.kernels import triton_came, triton_common, triton_dense, triton_factored, triton_lomo  # noqa: E402
from memopt.kernels.triton import came_step_, factored_step_, lomo_step_  # noqa: E402

MODULES = (triton_common, triton_dense, triton_factored, triton_came, triton_lomo)
_DTYPES = {torch.float32: "*fp32", torch.bool: "*i1", torch.int32: "*i32", torch.int64: "*i64"}


def arg_type(value) -> str:
    if torch.is_tensor(value):
        return _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def record_launches() -> dict[tuple, tuple[JITFunction, dict, dict]]:
    """Run the wrappers over every option combination with launches recorded, not run.
    Returns {(kernel name, signature, constexprs): (kernel, signature, constexprs)}."""
    seen: dict[tuple, tuple] = {}
    kernels = {id(v): v for mod in MODULES for v in vars(mod).values() if isinstance(v, JITFunction)}

    def recorder(kernel):
        names = [p.name for p in kernel.params]
        const = {p.name for p in kernel.params if p.is_constexpr}

        def run(*args, grid=None, warmup=False, **kwargs):
            bound = dict(zip(names, args), **kwargs)
            sig = {n: "constexpr" if n in const else arg_type(bound[n]) for n in names}
            consts = {n: bound[n] for n in names if n in const}
            key = (kernel.fn.__name__, tuple(sig.items()), tuple(consts.items()))
            seen.setdefault(key, (kernel, sig, consts))

        return run

    saved = {k: k.run for k in kernels.values()}
    for k in kernels.values():
        k.run = recorder(k)
    try:
        exercise()
    finally:
        for k, run in saved.items():
            k.run = run
    return seen


def exercise() -> None:
    """Every option combination of the three wrappers, on tiny CPU tensors."""
    z = torch.zeros
    for shape, beta_dev, step_dev, scale, beta1, wd, mult in itertools.product(
            [(8, 16), (4,)], [False, True], [False, True], [False, True], [None, 0.9], [0.0, 0.1], [False, True]):
        factored = len(shape) >= 2
        beta2 = torch.full((), 0.5) if beta_dev else 0.5
        step = torch.full((), 1e-2) if step_dev else 1e-2
        factored_step_(z(shape), z(shape), sq_row=z(shape[:-1]) if factored else None,
                       sq_col=z(shape[-1:]) if factored else None, sq=None if factored else z(shape),
                       exp_avg=z(shape) if beta1 is not None else None, beta2=beta2, eps1=1e-30, eps2=1e-3,
                       step_size=step, clip_threshold=1.0, weight_decay=wd, multiplicative_decay=mult,
                       scale_parameter=scale, beta1=beta1)
    for shape, wd in itertools.product([(8, 16), (4,)], [0.0, 0.1]):
        factored = len(shape) >= 2
        came_step_(z(shape), z(shape), exp_avg=z(shape), sq_row=z(shape[:-1]) if factored else None,
                   sq_col=z(shape[-1:]) if factored else None, res_row=z(shape[:-1]) if factored else None,
                   res_col=z(shape[-1:]) if factored else None, sq=None if factored else z(shape), lr=1e-3,
                   beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, clip_threshold=1.0,
                   weight_decay=wd)
        lomo_step_(z(shape), z(shape), lr=1e-3, weight_decay=wd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200, 80: A100)")
    ap.add_argument("--all", action="store_true", help="every variant the wrappers launch, not one per kernel")
    args = ap.parse_args(argv)
    launches = list(record_launches().values())
    if not args.all:
        # One variant per kernel: the one with the most constexpr flags on (the most code).
        best: dict[str, tuple] = {}
        for item in launches:
            name, on = item[0].fn.__name__, sum(bool(v) for v in item[2].values())
            if name not in best or on > sum(bool(v) for v in best[name][2].values()):
                best[name] = item
        launches = list(best.values())
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    start = time.time()
    for kernel, sig, consts in sorted(launches, key=lambda x: x[0].fn.__name__):
        flags = ", ".join(f"{k}={v}" for k, v in consts.items())
        try:
            compiled = triton.compile(ASTSource(kernel, sig, constexprs=consts), target=target)
        except Exception as exc:  # the compiler's errors are of many types; report them all
            failed += 1
            print(f"FAIL {kernel.fn.__name__} ({flags}): {' '.join(str(exc).split())[:400]}")
            continue
        print(f"ok   {kernel.fn.__name__} ({flags}): {len(compiled.asm['cubin'])} bytes of sm_{args.arch} cubin")
    print(f"{len(launches) - failed}/{len(launches)} kernel variants compiled for sm_{args.arch} "
          f"in {time.time() - start:.0f} s (triton {triton.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
