"""LARS: Layer-wise Adaptive Rate Scaling (You, Gitman and Ginsburg 2017,
https://arxiv.org/abs/1708.03888), the optimiser of SimCLR and SPCL for large batches.

For every parameter p with gradient g:

    g <- g + weight_decay * p
    trust = eta * |p| / |g|            (1 when either norm is 0)
    g <- trust * g
    mu <- momentum * mu + g
    p <- p - lr * mu

Biases and normalisation-layer parameters skip both the weight decay and the trust ratio (a plain
momentum step): they are told apart by shape (ndim <= 1), not by name, since names such as
torchvision's `downsample.1` do not say "bn".
"""
import torch


class LARS(torch.optim.Optimizer):
    """LARS with momentum; vectorised with torch._foreach_* so a step is a few fused kernels.

    Two things to know before copying it:
    - step() works in place on p.grad (weight decay and trust ratio are applied to it, as in
      torch.optim's foreach paths): after a step, p.grad holds the scaled update, not the raw
      gradient. Read or clip gradients before step(), and zero them before the next backward.
    - All parameters of a group must be on one device (the per-tensor norms are stacked into one
      tensor); put parameters of several devices in groups of their own.

    Args:
        params: iterable of parameters or parameter groups (each group may set its own
            lr, weight_decay, momentum, eta).
        lr: learning rate.  weight_decay: L2 factor added to the gradient of ndim > 1 parameters.
        momentum: momentum factor.  eta: trust coefficient.
    """

    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, eta=0.001):
        for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum),
                            ("eta", eta)):
            if not 0.0 <= value:
                raise ValueError(f"LARS: {name} must be >= 0, got {value}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError("LARS: sparse gradients are not supported")
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            plain = [p for p in params if p.ndim <= 1]       # biases and norm layers: as they are
            scaled = [p for p in params if p.ndim > 1]       # weights: decay and trust ratio
            if scaled:
                self._scale_grads_in_place(scaled, group["weight_decay"], group["eta"])
            params = plain + scaled
            grads = [p.grad for p in params]
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss

    @staticmethod
    def _scale_grads_in_place(params, weight_decay, eta):
        # In place on p.grad (like SGD's foreach path): out-of-place foreach ops would allocate a
        # copy of every gradient each step, which costs more than the arithmetic itself.
        grads = [p.grad for p in params]
        if weight_decay:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        p_norm = torch.stack(torch._foreach_norm(params))   # n
        g_norm = torch.stack(torch._foreach_norm(grads))    # n
        trust = torch.where((p_norm > 0) & (g_norm > 0), eta * p_norm / g_norm,
                            torch.ones_like(p_norm))
        # Per-tensor scalars as 0-d tensors: no .item(), so no device sync on the GPU.
        torch._foreach_mul_(grads, list(trust.unbind()))
