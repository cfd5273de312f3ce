"""What a training step costs, with every kind of pass priced by its FLOPs.

Methods do different kinds of work per step: forward/backward passes (the closure, SSAM-F's
Fisher chunks), building a Hessian's graph (a forward and a backward with ``create_graph``, A²SAM
and X-SAM's ``loss_closure``) and Hessian-vector products (a double backward through that
graph). Counting them all as "passes" undercounts: on ResNet-18 one HVP costs about two passes.
Here each kind is priced by ``torch.utils.flop_counter.FlopCounterMode`` (matmul/convolution
FLOPs) on a copy of the model on the ``meta`` device (shapes only, no arithmetic, no memory), and
the cost of a step is given in *SGD-step equivalents* (one forward + backward = 1)::

    cost_per_step = (passes − loss_closure_calls
                     + loss_closure_calls · graph_cost + hvps · hvp_cost) / steps

``passes`` is the driver's count (every closure, ``loss_closure`` and Fisher call).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def pass_flops(model: nn.Module, input_shape: tuple, num_classes: int,
               label_smoothing: float = 0.0) -> dict[str, float]:
    """FLOPs of one training pass, of a Hessian's graph and of one HVP on a batch of ``input_shape``.

    Returns ``{"flops_per_pass", "graph_cost", "hvp_cost"}`` (the last two relative to a pass).
    The model is copied to the meta device; the original is not touched.
    """
    meta = copy.deepcopy(model).to("meta").train()
    params = [p for p in meta.parameters() if p.requires_grad]
    x = torch.zeros(input_shape, device="meta")
    y = torch.zeros(input_shape[0], dtype=torch.long, device="meta")

    def loss() -> torch.Tensor:
        return F.cross_entropy(meta(x).float(), y, label_smoothing=label_smoothing)

    one_pass = _flops(lambda: torch.autograd.grad(loss(), params))
    grads: list[torch.Tensor] = []
    graph = _flops(lambda: grads.extend(torch.autograd.grad(loss(), params, create_graph=True)))
    used = [(g, p) for g, p in zip(grads, params) if g.requires_grad]
    hvp = _flops(lambda: torch.autograd.grad([g for g, _ in used], [p for _, p in used],
                                             grad_outputs=[torch.zeros_like(g) for g, _ in used],
                                             allow_unused=True))
    if one_pass <= 0:
        raise ValueError("the FLOP counter saw no matmul/convolution in a training pass")
    return {"flops_per_pass": float(one_pass), "graph_cost": graph / one_pass,
            "hvp_cost": hvp / one_pass}


def cost_per_step(*, passes: int, loss_closure_calls: int, hvps: int, steps: int,
                  graph_cost: float, hvp_cost: float) -> float:
    """SGD-step equivalents per step (see the module docstring)."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    return (passes - loss_closure_calls + loss_closure_calls * graph_cost + hvps * hvp_cost) / steps


def cost_record(module: Any, opt: Any) -> dict[str, Any]:
    """The cost entries of metrics.json for a finished (or interrupted) run."""
    shape = getattr(module, "input_shape", None)
    if not module.steps_done or shape is None:
        return {}
    prices = pass_flops(module.model, shape, module.num_classes,
                        getattr(module, "label_smoothing", 0.0))
    lc_calls = getattr(opt, "num_loss_closure_calls", 0) or 0
    hvps = getattr(opt, "num_hvps", 0) or 0
    cost = cost_per_step(passes=module.passes, loss_closure_calls=lc_calls, hvps=hvps,
                         steps=module.steps_done, graph_cost=prices["graph_cost"],
                         hvp_cost=prices["hvp_cost"])
    record = {"cost_per_step": cost, "flops_per_step": cost * prices["flops_per_pass"],
              "flops_per_pass": prices["flops_per_pass"], "hvp_cost_passes": prices["hvp_cost"],
              "hessian_graph_cost_passes": prices["graph_cost"],
              "cost_counter": "torch.utils.flop_counter (matmul/conv FLOPs, meta device)"}
    if hasattr(opt, "solve_summary"):
        record.update(opt.solve_summary())
    return record


def main(argv: list[str] | None = None) -> None:
    """``python -m sharpbench.cost --model resnet18 --batch 128``: the FLOP prices of a model."""
    import argparse

    from .models import build_model
    ap = argparse.ArgumentParser(description="FLOPs of a training pass, a Hessian graph and an HVP")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    args = ap.parse_args(argv)
    prices = pass_flops(build_model(args.model, num_classes=args.num_classes),
                        (args.batch, 3, 32, 32), args.num_classes, args.label_smoothing)
    print(f"{args.model}, batch {args.batch}: one pass (forward + backward) "
          f"{prices['flops_per_pass'] / 1e9:.1f} GFLOP; Hessian graph {prices['graph_cost']:.2f} "
          f"passes; one HVP {prices['hvp_cost']:.2f} passes")


if __name__ == "__main__":
    main()
