"""The CPU kernels as PyTorch operators: registration, autograd, torch.compile, fork safety."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
from torch import nn

from finefp8 import ops
from finefp8 import quantization as Q
from finefp8.kernels import cpu
from finefp8.nn import FP8Config, FP8Linear

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels did not build")


def _weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return Q.quantize_blockwise(torch.randn(n, k, generator=g) * k**-0.5)


def _dequant64(q: torch.Tensor, s: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """``q * s`` per block in float64, by explicit repetition of the scale grid."""
    n, k = q.shape
    full = s.double().repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return q.double() * full


def test_operators_are_registered_with_fake_implementations():
    from finefp8.kernels import cpu_library

    q, s = _weight(200, 300, 0)
    x = torch.randn(3, 300)
    for name, args in [
        ("weight_only_linear", (x, q, s, None, [128, 128])),
        ("quantize_blockwise", (x, [128, 128], "fp32", "e4m3", 1e-10, False, None)),
        ("quantize_groupwise", (x, 128, "ue8m0", "e4m3", 1e-10, False, None)),
        ("dequantize_blockwise", (q, s, [128, 128], torch.bfloat16, None)),
        ("fake_quantize_groupwise", (x, 128, "fp32", "e4m3", 1e-10, False, None)),
    ]:
        op = getattr(torch.ops.finefp8, name)
        assert cpu_library.OPS[name] is op
        torch.library.opcheck(op, args, test_utils=("test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("tokens", [1, 5, cpu.FUSED_LINEAR_MAX_TOKENS, cpu.FUSED_LINEAR_MAX_TOKENS + 1, 150])
def test_linear_keeps_autograd_at_every_token_count(tokens):
    """The output requires grad whenever x does (the kernels used to detach up to 64 tokens),
    and the gradients equal the float64 ones: dx = dy @ W, dbias = sum dy, dscale per block."""
    n, k = 130, 300
    q, s = _weight(n, k, tokens)
    g = torch.Generator().manual_seed(tokens + 1)
    x = torch.randn(tokens, k, generator=g, requires_grad=True)
    bias = torch.randn(n, generator=g, requires_grad=True)
    scale = s.clone().requires_grad_(True)
    y = ops.weight_only_linear(x, q, scale, bias, backend="cpu")
    assert y.requires_grad and y.grad_fn is not None
    dy = torch.randn(tokens, n, generator=g)
    y.backward(dy)
    w64 = _dequant64(q, s)
    torch.testing.assert_close(x.grad.double(), dy.double() @ w64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad.double(), dy.double().sum(0), rtol=1e-5, atol=1e-5)
    gw = dy.double().T @ x.detach().double()  # dL/dW; dL/ds = sum over the block of dL/dW * q
    terms = torch.nn.functional.pad(gw * q.double(), (0, 384 - k, 0, 256 - n)).view(2, 128, 3, 128)
    size = (dy.double().abs().T @ x.detach().double().abs()) * q.double().abs()
    size = torch.nn.functional.pad(size, (0, 384 - k, 0, 256 - n)).view(2, 128, 3, 128)
    err = (scale.grad.double() - terms.sum(dim=(1, 3))).abs()
    assert bool((err <= 1e-5 * size.sum(dim=(1, 3))).all())  # fp32 sums of exact-ish terms
    with torch.no_grad():
        assert not ops.weight_only_linear(x, q, s, backend="cpu").requires_grad


def test_dequantize_gradient_is_per_block_sum():
    q, s = _weight(200, 300, 3)
    scale = s.clone().requires_grad_(True)
    out = ops.dequantize_blockwise(q, scale, dtype=torch.float32, backend="cpu")
    g = torch.randn(200, 300, generator=torch.Generator().manual_seed(4))
    out.backward(g)
    terms = torch.nn.functional.pad(g.double() * q.double(), (0, 84, 0, 56)).view(2, 128, 3, 128)
    want, size = terms.sum(dim=(1, 3)), terms.abs().sum(dim=(1, 3))
    # fp32 sums of 128 x 128 terms: within 1e-5 of the sum of their magnitudes
    assert bool(((scale.grad.double() - want).abs() <= 1e-5 * size).all())


def test_quantize_has_no_gradient_but_says_what_to_use():
    x = torch.randn(4, 256, requires_grad=True)
    q, s = ops.quantize_groupwise(x, backend="cpu")
    assert s.requires_grad  # as any torch operator of a requires_grad input
    with pytest.raises(RuntimeError, match="not differentiable.*fake_quantize_groupwise"):
        s.sum().backward()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fake_quantize_is_straight_through(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 300, generator=g, requires_grad=True)
    y = ops.fake_quantize_groupwise(x, backend=backend)
    q, s = Q.quantize_groupwise(x.detach())
    want = q.double() * s.double().repeat_interleave(128, -1)[..., :300]
    assert torch.equal(y.detach().double(), want.float().double())
    dy = torch.randn(3, 7, 300, generator=g)
    y.backward(dy)
    assert torch.equal(x.grad, dy)


def test_torch_compile_of_fp8_linear_layers_matches_eager():
    """One graph, no break (fullgraph=True), same outputs as eager, weight_only and w8a8."""
    torch.manual_seed(0)
    model = nn.Sequential(
        FP8Linear.from_linear(nn.Linear(256, 384), FP8Config(mode="weight_only")), nn.ReLU(),
        FP8Linear.from_linear(nn.Linear(384, 130), FP8Config())).eval()
    x = torch.randn(3, 5, 256)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert compiled.shape == (3, 5, 130)
    assert torch.equal(compiled, eager)


def _child_quantize(w: torch.Tensor, queue) -> None:
    torch.set_num_threads(2)  # make the kernel split the call over the (reset) pool
    q, s = cpu.quantize_blockwise(w)
    # plain bytes: torch's tensor sharing through a queue is a different subject
    queue.put((q.view(torch.uint8).numpy().tobytes(), s.numpy().tobytes()))


def test_kernels_work_in_a_forked_child():
    """After os.fork() the parent's pool has no threads in the child: it must be recreated
    there instead of waiting forever."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(1024, 640, generator=g).to(torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        want = cpu.quantize_blockwise(w)  # the parent's pool now exists and has run work
    finally:
        torch.set_num_threads(threads)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_quantize, args=(w, queue))
    child.start()
    try:  # read before join: a child blocks at exit until its queued data is read
        q, s = queue.get(timeout=120)
    except Exception:  # queue.Empty: nothing came back in time
        q = None
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
    assert q is not None, "the forked child hung in the CPU kernels"
    assert child.exitcode == 0
    assert q == want[0].view(torch.uint8).numpy().tobytes() and s == want[1].numpy().tobytes()
