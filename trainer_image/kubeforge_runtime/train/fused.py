"""Memory-light training pieces for Llama-family models: the same math in fewer passes.

Called by the trainer (``trainer.py``, :func:`apply`, right after the model is built) when
``training.fused`` resolves to on (:func:`resolve`), and by ``benchmarks/bench_fused.py``.
Liger-Kernel's idea written in plain torch for the CPU: custom autograd Functions whose
backward is written by hand and saves fewer tensors than autograd's chain of small ops.

* :class:`RMSNormFunction` - ``LlamaRMSNorm``: saves the input and one scale per row
  (autograd keeps the squared input, the normalised input and more), backward in five
  passes over the activation.
* :class:`RotaryFunction` - RoPE on q and k in one Function: ``x*cos + rotate_half(x)*sin``
  by halves, nothing saved but cos/sin (autograd's ``rotate_half`` slices and concatenates,
  and each slice's backward fills a zero tensor of the whole size).
* :class:`LinearCrossEntropy` - the final ``lm_head`` and the summed token cross-entropy in
  row chunks: each chunk's logits are turned into their gradient (softmax minus one-hot)
  during the forward, and the head's weight and input gradients accumulated there, so no
  full ``(tokens, vocab)`` logits, log-softmax or its gradient is ever held.

Where they apply (:func:`apply` swaps forwards per module instance; parameter names and
state dicts do not change, so checkpoints are interchangeable with stock runs): RMSNorm and
RoPE on every Llama-style decoder layer in every layout (tensor parallelism keeps the norms
replicated and hands the attention plain local q/k; LoRA adapters sit on the linears, which
are still called as modules, so FSDP2's, DeepSpeed's and peft's hooks run as before). A
module whose tensors arrive as DTensors falls back to the stock math. Not with compiled
blocks (``training.compile``: Inductor fuses the stock modules itself) and only on fp32
compute (autocast's bf16/fp16 casts stay with the stock modules), not for QLoRA and not
with distillation (its tensor-parallel layout test drifted to 1.3e-5 against its 1e-5
tolerance with them; not investigated). The fused head runs only
where the head's weight is a plain, whole tensor during the forward: one data-parallel rank
or DDP, no pipeline schedule, no distillation (its loss reads whole logits), an unbiased
``nn.Linear`` head (``CausalLMStage.forward(labels=...)``; the trainer decides, see
``Trainer._fused_head``). SwiGLU (``silu(gate) * up``) is left to the stock module: by hand
in eager torch it takes as many passes as autograd's.

``tests/unit/runtime/train/test_train_fused.py`` checks outputs and every gradient against
the stock modules.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX

log = logging.getLogger(__name__)

HEAD_CHUNK_ROWS = 256
"""Rows per chunk of :class:`LinearCrossEntropy` (256 x a vocabulary of 8000 fp32 logits:
8 MiB, which stays in this CPU's cache between the matmul and the softmax)."""


def resolve(requested: str, device_type: str, *, compiled: bool, fp32: bool, qlora: bool = False,
            distillation: bool = False) -> bool:
    """Whether to use the fused pieces for ``training.fused``: ``on`` wherever they apply,
    ``off`` never, ``auto`` off for now on every device: on the trainer benchmark's CPU run
    the whole step was not faster with them (README, "Training throughput"); they hold fewer
    tensors (no whole logits), which is what ``on`` buys. Never with compiled blocks,
    non-fp32 compute, QLoRA (NF4 weights) or distillation (see above), whatever was asked.
    ``device_type`` is kept for a device where they are measured faster."""
    del device_type
    if requested == "off" or compiled or not fp32 or qlora or distillation:
        return False
    return requested == "on"


def _is_dtensor(*ts: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(t, DTensor) for t in ts)


# --- RMSNorm ------------------------------------------------------------------------------
class RMSNormFunction(torch.autograd.Function):
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension (LlamaRMSNorm's math, in
    its order: the forward is bit-identical); saves ``x`` and the per-row scale."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x * rstd)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        xhat = x * rstd
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (grad * xhat).reshape(-1, x.shape[-1]).sum(0)
        gx = None
        if ctx.needs_input_grad[0]:
            gxhat = grad * weight
            # d/dx of xhat = x * rstd: rstd * (gxhat - xhat * mean(gxhat * xhat))
            dot = (gxhat * xhat).mean(-1, keepdim=True)
            gx = gxhat.addcmul_(xhat, dot, value=-1).mul_(rstd)
        return gx, gw, None


def _rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    if torch.float32 != hidden_states.dtype or torch.float32 != self.weight.dtype \
            or _is_dtensor(hidden_states, self.weight):
        return type(self).forward(self, hidden_states)
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


# --- RoPE ---------------------------------------------------------------------------------
def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` by halves (``rotate_half(x) = (-x2, x1)``), or its
    transpose (``transpose``: the backward, ``(x1*cos1 + x2*sin2, x2*cos2 - x1*sin1)``).
    ``cos``/``sin`` broadcast against ``x``."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c1, c2, s1, s2 = cos[..., :h], cos[..., h:], sin[..., :h], sin[..., h:]
    out = torch.empty_like(x)
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, c1, out=o1)
    torch.mul(x2, c2, out=o2)
    if transpose:
        o1.addcmul_(x2, s2)
        o2.addcmul_(x1, s1, value=-1)
    else:
        o1.addcmul_(x2, s1, value=-1)
        o2.addcmul_(x1, s2)
    return out


class RotaryFunction(torch.autograd.Function):
    """RoPE on q and k (``apply_rotary_pos_emb``'s math) in one Function; only cos and sin
    are saved. The backward of a rotation is its transpose (the rotation by -sin)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    @staticmethod
    def backward(ctx: Any, gq: torch.Tensor, gk: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        return (None if gq is None else _rotate(gq, cos, sin, transpose=True),
                None if gk is None else _rotate(gk, cos, sin, transpose=True), None, None)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for transformers' ``apply_rotary_pos_emb`` (stock math for DTensors and for
    cos/sin that need a gradient, which RoPE tables never do)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if _is_dtensor(q, k) or cos.requires_grad or sin.requires_grad or q.shape[-1] % 2:
        from transformers.models.llama.modeling_llama import rotate_half

        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    return RotaryFunction.apply(q, k, cos, sin)


def attention_forward(self: nn.Module, hidden_states: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                      attention_mask: Any = None, cache: Any = None, *, project: Any = None, rotary: Any = None,
                      **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """``LlamaAttention.forward`` (transformers 5.x) with q/k/v from ``project(x, (q_proj,
    k_proj, v_proj))`` (default: each projection on its own; ``merged`` passes its one-GEMM
    projection) and RoPE by ``rotary`` (default :func:`apply_rotary`). Training has no KV cache
    (the trainer sets ``use_cache`` off), so a cache takes the stock forward."""
    if cache is not None or kwargs.get("past_key_values") is not None or position_embeddings is None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    linears = (self.q_proj, self.k_proj, self.v_proj)
    qkv = project(hidden_states, linears) if project is not None else tuple(lin(hidden_states) for lin in linears)
    q, k, v = (t.view(hidden_shape).transpose(1, 2) for t in qkv)
    cos, sin = position_embeddings
    q, k = (rotary or apply_rotary)(q, k, cos, sin)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    dropout = self.attention_dropout if self.training else 0.0
    out, weights = interface(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


# --- lm_head + cross-entropy --------------------------------------------------------------
class LinearCrossEntropy(torch.autograd.Function):
    """``cross_entropy(h @ weight.T, labels, reduction="sum", ignore_index=-100)`` in row
    chunks, the gradients of ``h`` and ``weight`` computed in the forward (the loss is a
    scalar: backward only scales them by its incoming gradient)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk: int = HEAD_CHUNK_ROWS, grads: bool = True) -> torch.Tensor:
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        total = h.new_zeros(())
        for begin in range(0, h.shape[0], chunk):
            hc, yc = h[begin:begin + chunk], labels[begin:begin + chunk]
            logits = hc @ weight.t()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            valid = yc != IGNORE_INDEX
            safe = torch.where(valid, yc, 0).unsqueeze(1)
            picked = logits.gather(1, safe)
            total += ((lse - picked).squeeze(1) * valid).sum()
            if gh is None and gw is None:
                continue
            grad = logits.sub_(lse).exp_()  # softmax, in place of the logits
            grad.scatter_add_(1, safe, torch.full_like(picked, -1.0))
            if not bool(valid.all()):
                grad.mul_(valid.unsqueeze(1))
            if gh is not None:
                torch.mm(grad, weight, out=gh[begin:begin + chunk])
            if gw is not None:
                gw.addmm_(grad.t(), hc)
        ctx.save_for_backward(*(g for g in (gh, gw) if g is not None))
        ctx.has = (gh is not None, gw is not None)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        gh = saved.pop(0) * grad if ctx.has[0] else None
        gw = saved.pop(0) * grad if ctx.has[1] else None
        return gh, gw, None, None, None


def head_loss(head: nn.Module, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed token cross-entropy of ``head(h)`` against ``labels`` ((tokens, hidden) and
    (tokens,)), through :class:`LinearCrossEntropy` for a plain fp32 head (the stock
    linear and ``F.cross_entropy`` otherwise)."""
    w = head.weight
    # A plain tensor only: QLoRA's NF4 weights and other tensor subclasses take the stock path.
    if (type(head) is nn.Linear and head.bias is None and w.dtype == h.dtype == torch.float32
            and type(w.detach()) is torch.Tensor and type(h.detach()) is torch.Tensor):
        # Without grad mode (validation) the forward computes no gradients.
        return LinearCrossEntropy.apply(h, w, labels, HEAD_CHUNK_ROWS, torch.is_grad_enabled())
    return F.cross_entropy(head(h).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


# --- swapping them in ---------------------------------------------------------------------
def apply(lm: nn.Module) -> dict[str, int]:
    """Swap the fused RMSNorm and RoPE into ``lm`` (a Llama-style ``*ForCausalLM``) in place,
    per module instance; returns how many modules of each kind were swapped. Modules of
    other families (other class names) are left alone."""
    counts = {"rmsnorm": 0, "rotary": 0}
    for module in lm.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and type(module).forward is not None:
            if _stock_rms_norm(module):
                module.forward = types.MethodType(_rms_norm_forward, module)
                counts["rmsnorm"] += 1
        elif name in ("LlamaAttention",) and hasattr(module, "head_dim"):
            module.forward = types.MethodType(attention_forward, module)
            counts["rotary"] += 1
    log.info("fused training pieces: %d RMSNorm, %d attention RoPE", counts["rmsnorm"], counts["rotary"])
    return counts


def _stock_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` is an RMSNorm whose math is LlamaRMSNorm's (weight times the
    normalised input; Gemma's ``1 + weight`` variant is not)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return type(module).forward is LlamaRMSNorm.forward
