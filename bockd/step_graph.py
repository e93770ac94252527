"""One CUDA graph per training step: forward, loss and backward of a full batch captured once, then replayed.

Why: a CIFAR ResNet ensemble step at batch 128 is a few thousand small kernels. On a fast GPU the host
cannot launch them as fast as the GPU runs them, so launch overhead, not arithmetic, sets the pace; a
replayed graph launches them all at once.

What keeps it correct (``runtime.cuda_graph``; the engine uses it on CUDA in one process):
- Static shapes: only full batches come here; the engine runs a smaller last batch eagerly (same math).
- Static memory: each step's inputs are copied into fixed buffers; the outputs and every parameter's
  gradient live in the graph's private pool and are overwritten by the next replay, so read them first.
- Gradients: captured with ``.grad`` unset, so the replay *writes* each gradient (no zeroing needed).
  The optimizer step stays outside the graph (eager; fused on CUDA), so the learning-rate schedule keeps
  plain float learning rates. An eager step after the capture must zero gradients in place
  (``zero_grad(set_to_none=False)``): dropping them would detach ``.grad`` from what the graph writes.
- Warm-up: the first ``warmup`` steps run eagerly on a side stream before the capture (lazy cuDNN and
  cuBLAS set-up, cuDNN autotuning, torch.compile's compilation must not happen inside a capture). They are
  real training steps, so a run trains exactly the same steps as an eager one.
- Autocast's weight-cast cache must be off while capturing (the engine does this when graphs are on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

StepBody = Callable[[Tensor, Tensor, Tensor], Sequence[Tensor]]


class GraphedStep:
    """Runs ``body(x, y, distill_scale)`` (forward + loss + backward; returns tensors) for full batches:
    eagerly for the first ``warmup`` calls, then captured once and replayed.

    ``zero_grad(set_to_none)`` is the optimizer's; it is called before each warm-up step and before the
    capture. ``distill_scale`` arrives as a float and reaches ``body`` as a 0-dim device tensor, filled
    in place each step, so a changing ramp-up factor needs no new graph.
    """

    def __init__(
        self, body: StepBody, zero_grad: Callable[[bool], None], device: torch.device, warmup: int = 3
    ):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.body = body
        self.zero_grad = zero_grad
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._scale = torch.ones((), device=device)
        self._side = torch.cuda.Stream(device)
        self._x: Tensor | None = None
        self._y: Tensor | None = None
        self._out: tuple[Tensor, ...] = ()

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, x: Tensor, y: Tensor, distill_scale: float = 1.0) -> tuple[Tensor, ...]:
        self._scale.fill_(distill_scale)  # a kernel with the value as argument: no host-to-device copy
        self.calls += 1
        if self.graph is None and self.calls <= self.warmup:
            return self._eager_on_side_stream(x, y)
        if self.graph is None:
            self._capture(x, y)
        assert self.graph is not None and self._x is not None and self._y is not None
        self._x.copy_(x)
        self._y.copy_(y)
        self.graph.replay()
        return self._out

    def _eager_on_side_stream(self, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        self.zero_grad(True)
        current = torch.cuda.current_stream(x.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            out = tuple(self.body(x, y, self._scale))
        current.wait_stream(self._side)
        return out

    def _capture(self, x: Tensor, y: Tensor) -> None:
        self.zero_grad(True)  # the captured backward then allocates every .grad in the graph's pool
        self._x, self._y = x.clone(), y.clone()  # clone keeps channels_last strides
        graph = torch.cuda.CUDAGraph()
        # Captured on the warm-up stream: per-stream library state (cuBLAS workspaces) already exists there.
        self._side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.graph(graph, stream=self._side):
            self._out = tuple(self.body(self._x, self._y, self._scale))
        self.graph = graph  # capturing ran nothing: the caller's replay performs this step
