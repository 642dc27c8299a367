"""The small-M projection kernel (kernels/gemv.py) against float64 matrix products, on fresh random
inputs: in Triton's interpreter on the CPU (small shapes), and at real model shapes on a GPU."""

import pytest
import torch

from lightllm_nb.kernels import (GEMV_MAX_M, add_rmsnorm, add_rmsnorm_torch, gemv, gemv_torch, silu_mul,
                                 silu_mul_torch)

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _inputs(seed, m, n, k, dtype, bias, strided):
    gen = torch.Generator(DEVICE).manual_seed(seed)
    # x as a column slice of a wider buffer, as the model passes rows of a fused activation.
    wide = torch.randn(m, k + (37 if strided else 0), generator=gen, device=DEVICE).to(dtype)
    x = wide[:, :k]
    w = (torch.randn(n, k, generator=gen, device=DEVICE) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if bias else None
    return x, w, b


def _reference(x, w, b):
    out = x.double() @ w.double().t()
    return out + b.double() if b is not None else out


def _check(out, x, w, b, dtype):
    assert out.shape == (x.shape[0], w.shape[0]) and out.dtype == dtype
    ref = _reference(x, w, b)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    # float32 sums: far under 1e-5 in float32; rounding of the output alone in half types.
    assert err < (1e-5 if dtype == torch.float32 else 5e-3), err
    assert torch.isfinite(out).all()


# Interpreter-sized cases: K not a multiple of the block, N not a multiple of the block, every M.
CASES = [(1, 40, 200, 64, 1), (2, 33, 130, 32, 1), (3, 16, 257, 64, 3), (4, 50, 96, 32, 2), (1, 7, 300, 128, 4)]


@pytest.mark.parametrize("m, n, k, block_k, split_k", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_float64(m, n, k, block_k, split_k, bias):
    dtype = torch.float32
    x, w, b = _inputs(m * 1000 + n + k + split_k, m, n, k, dtype, bias, strided=m > 1)
    out = gemv(x, w, b, block_n=16, block_k=block_k, split_k=split_k)
    _check(out, x, w, b, dtype)
    _check(gemv_torch(x, w, b), x, w, b, dtype)


# (m, n, k, block_k, split_k): one and several rows, K not a multiple of the block, split K.
SWIGLU_CASES = [(1, 40, 200, 64, 1), (3, 16, 257, 64, 3), (1, 7, 300, 128, 4)]


@pytest.mark.parametrize("m, n, k, block_k, split_k", SWIGLU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gemv_is_silu_mul_then_gemv(m, n, k, block_k, split_k, dtype):
    """The fused input read gives the same bits as SiLU-mul's stored output fed to the same GEMV."""
    gate_up, w, _ = _inputs(m + n + k + split_k, m, n, 2 * k, dtype, False, strided=m > 1)
    w = w[:, :k].contiguous()
    tuning = dict(block_n=16, block_k=block_k, split_k=split_k)
    fused = gemv(gate_up, w, swiglu=True, **tuning)
    assert torch.equal(fused, gemv(silu_mul(gate_up), w, **tuning))
    torch.testing.assert_close(gemv_torch(gate_up, w, swiglu=True), gemv_torch(silu_mul_torch(gate_up), w),
                               rtol=0, atol=0)
    if dtype == torch.float32:
        _check(fused, silu_mul_torch(gate_up), w, None, dtype)


@pytest.mark.parametrize("m, n, k, block_k, split_k", [(1, 40, 200, 64, 1), (3, 33, 130, 32, 3), (1, 7, 300, 128, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_then_add_rmsnorm_is_the_pair(m, n, k, block_k, split_k, dtype):
    """The last column block adds the rows into the residual and normalizes them: the same bits as
    the GEMV followed by add_rmsnorm, the residual updated in place, the counters left zero."""
    x, w, _ = _inputs(7 * m + n + split_k, m, n, k, dtype, False, strided=m > 1)
    gen = torch.Generator(DEVICE).manual_seed(n)
    residual = torch.randn(m, n, generator=gen, device=DEVICE).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(n, generator=gen, device=DEVICE)).to(dtype)
    tuning = dict(block_n=16, block_k=block_k, split_k=split_k)
    twin_residual, expected_residual = residual.clone(), residual.clone()
    expected, _ = add_rmsnorm(gemv(x, w, **tuning), expected_residual, norm_weight, 1e-5)
    counters = torch.zeros(-(-n // 16) + 1, dtype=torch.int32, device=DEVICE)
    normed, returned = gemv(x, w, add_rmsnorm=(residual, norm_weight, 1e-5), split_counters=counters, **tuning)
    assert returned is residual and torch.equal(residual, expected_residual)
    assert torch.equal(normed, expected)
    assert not counters.any()
    twin, _ = gemv_torch(x, w, add_rmsnorm=(twin_residual, norm_weight, 1e-5))
    if dtype == torch.float32:
        torch.testing.assert_close((twin, twin_residual), (normed, residual), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="residual must be"):
        gemv(x, w, add_rmsnorm=(residual.t(), norm_weight, 1e-5), **tuning)


def test_split_k_is_deterministic():
    """The last split of each column block sums all of them in split order, and leaves its counter
    zero: one set of counters serves call after call with the same bits."""
    x, w, b = _inputs(5, 2, 24, 300, torch.float32, True, strided=False)
    counters = torch.zeros(3 + 1, dtype=torch.int32)  # 24 outputs / block_n 8, one to spare
    first = gemv(x, w, b, block_n=8, block_k=32, split_k=4)
    for _ in range(2):
        assert torch.equal(gemv(x, w, b, split_counters=counters, block_n=8, block_k=32, split_k=4), first)
        assert not counters.any()
    with pytest.raises(ValueError, match="split_counters must be"):
        gemv(x, w, b, split_counters=counters[:2], block_n=8, block_k=32, split_k=4)


def test_gemv_says_what_to_use_instead():
    x, w, _ = _inputs(0, GEMV_MAX_M + 1, 8, 16, torch.float32, False, strided=False)
    with pytest.raises(ValueError, match="use a GEMM"):
        gemv(x, w)
    with pytest.raises(ValueError, match="contiguous K"):
        gemv(x[:1], w.t().contiguous().t())
    with pytest.raises(ValueError, match=r"x \[M, 2K\]"):
        gemv(x[:1], w, swiglu=True)


# Real shapes (Llama-3.2-1B qkv / down / gate_up, a Qwen-sized vocabulary head), GPU only.
GPU_SHAPES = [(3072, 2048), (2048, 8192), (16384, 2048), (151936, 896)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, k", GPU_SHAPES)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("split_k", [1, 4])
def test_gemv_gpu_shapes(dtype, n, k, m, split_k):
    x, w, b = _inputs(n + k + m + split_k, m, n, k, dtype, bias=split_k == 4, strided=True)
    out = gemv(x, w, b, block_n=8, block_k=512, split_k=split_k)
    _check(out, x, w, b, dtype)
    if split_k > 1:  # the in-kernel reduce under real concurrency, counters reused: the same bits each call
        counters = torch.zeros(-(-n // 8), dtype=torch.int32, device=DEVICE)
        for _ in range(10):
            assert torch.equal(gemv(x, w, b, split_counters=counters, block_n=8, block_k=512, split_k=split_k), out)
        assert not counters.any()
    if dtype != torch.float32:
        # Both sum in float32 and round once: at most one unit in the last place apart.
        torch.testing.assert_close(out, gemv_torch(x, w, b), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k", [(2048, 8192), (896, 4864)])
@pytest.mark.parametrize("split_k", [1, 8])
def test_swiglu_gemv_gpu_shapes(dtype, n, k, split_k):
    """Llama-3.2-1B's and Qwen2.5-0.5B's down projections: bit for bit SiLU-mul then the GEMV."""
    gate_up, w, _ = _inputs(n + k + split_k, 1, n, 2 * k, dtype, False, strided=True)
    w = w[:, :k].contiguous()
    tuning = dict(block_n=4, block_k=1024, split_k=split_k)
    fused = gemv(gate_up, w, swiglu=True, **tuning)
    assert torch.equal(fused, gemv(silu_mul(gate_up), w, **tuning))
    _check(fused, silu_mul_torch(gate_up), w, None, dtype)


def test_decode_linear_uses_the_gemv_only_where_chosen():
    from lightllm_nb.models.decode_linear import DecodeLinear

    x, w, b = _inputs(9, 4, 24, 64, torch.float32, True, strided=False)
    chosen = DecodeLinear({(24, 64): dict(block_n=8, block_k=32, split_k=2)})
    # One row of the chosen shape goes through the GEMV with the chosen configuration.
    assert torch.equal(chosen(x[:1], w, b), gemv(x[:1], w, b, block_n=8, block_k=32, split_k=2))
    _check(chosen(x[:1], w, b), x[:1], w, b, torch.float32)
    # Several rows, or a shape without a measured choice, keep F.linear: exactly its result.
    linear = torch.nn.functional.linear
    assert torch.equal(chosen(x[:3], w, b), linear(x[:3], w, b))
    assert torch.equal(DecodeLinear()(x[:1], w, b), linear(x[:1], w, b))


def test_decode_linear_adds_rmsnorm_in_the_gemv_only_where_chosen():
    from lightllm_nb.models.decode_linear import DecodeLinear
    from lightllm_nb.models.kernel_set import kernels_for

    kernels = kernels_for(torch.device(DEVICE))
    x, w, _ = _inputs(13, 2, 48, 64, torch.float32, False, strided=False)
    gen = torch.Generator(DEVICE).manual_seed(3)
    residual = torch.randn(2, 48, generator=gen, device=DEVICE)
    norm_weight = 1 + torch.rand(48, generator=gen, device=DEVICE)
    tuning = dict(block_n=16, block_k=32, split_k=2, num_warps=1)  # norm_warps(48) == 1
    chosen = DecodeLinear({(48, 64): tuning})
    fused_residual, pair_residual = residual[:1].clone(), residual[:1].clone()
    fused = chosen.then_add_rmsnorm(x[:1], w, fused_residual, norm_weight, 1e-6, kernels)
    assert torch.equal(fused[0], gemv(x[:1], w, add_rmsnorm=(pair_residual, norm_weight, 1e-6), **tuning)[0])
    assert torch.equal(fused_residual, pair_residual)
    # Two rows, or warps that would reduce the norm in another order: the projection, then add_rmsnorm.
    for linear, rows in ((chosen, x), (DecodeLinear({(48, 64): dict(tuning, num_warps=4)}), x[:1])):
        got_residual, want_residual = residual[:rows.shape[0]].clone(), residual[:rows.shape[0]].clone()
        got, _ = linear.then_add_rmsnorm(rows, w, got_residual, norm_weight, 1e-6, kernels)
        want, _ = kernels.add_rmsnorm(linear(rows, w), want_residual, norm_weight, 1e-6)
        assert torch.equal(got, want) and torch.equal(got_residual, want_residual)


def test_decode_linear_swiglu_fuses_only_where_chosen():
    from lightllm_nb.models.decode_linear import DecodeLinear

    gate_up, w, _ = _inputs(11, 3, 24, 128, torch.float32, False, strided=False)
    w = w[:, :64].contiguous()
    tuning = dict(block_n=8, block_k=32, split_k=2)
    chosen = DecodeLinear({(24, 64): tuning}, swiglu_choices={(24, 64): tuning})
    assert torch.equal(chosen.swiglu(gate_up[:1], w, silu_mul_torch), gemv(gate_up[:1], w, swiglu=True, **tuning))
    # Several rows, or no fused choice: SiLU-mul, then the projection as __call__ runs it.
    unfused = torch.nn.functional.linear(silu_mul_torch(gate_up), w)
    assert torch.equal(chosen.swiglu(gate_up, w, silu_mul_torch), unfused)
    plain = DecodeLinear({(24, 64): tuning})
    assert torch.equal(plain.swiglu(gate_up[:1], w, silu_mul_torch), gemv(silu_mul_torch(gate_up[:1]), w, **tuning))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("split_k", [1, 4])
def test_gemv_then_add_rmsnorm_gpu(swiglu, split_k):
    """Llama-3.2-1B's o (2048 x 2048) and down (2048 x 8192 of silu(gate) * up), then add_rmsnorm
    in the same launch: bit for bit the GEMV followed by the add_rmsnorm kernel, call after call."""
    n, k = (2048, 8192) if swiglu else (2048, 2048)
    x, w, _ = _inputs(n + k + split_k, 1, n, 2 * k if swiglu else k, torch.bfloat16, False, strided=True)
    w = w[:, :k].contiguous()
    gen = torch.Generator(DEVICE).manual_seed(split_k)
    residual = torch.randn(1, n, generator=gen, device=DEVICE).to(torch.bfloat16)
    norm_weight = (1 + 0.1 * torch.randn(n, generator=gen, device=DEVICE)).to(torch.bfloat16)
    tuning = dict(block_n=4, block_k=1024, split_k=split_k, num_warps=4, swiglu=swiglu)
    expected_residual = residual.clone()
    expected, _ = add_rmsnorm(gemv(x, w, **tuning), expected_residual, norm_weight, 1e-5)
    counters = torch.zeros(n // 4 + 1, dtype=torch.int32, device=DEVICE)
    for _ in range(10):
        fused_residual = residual.clone()
        normed, _ = gemv(x, w, add_rmsnorm=(fused_residual, norm_weight, 1e-5), split_counters=counters, **tuning)
        assert torch.equal(normed, expected) and torch.equal(fused_residual, expected_residual)
    assert not counters.any()
    twin_residual = residual.clone()
    twin, _ = gemv_torch(x, w, swiglu=swiglu, add_rmsnorm=(twin_residual, norm_weight, 1e-5))
    torch.testing.assert_close(twin, expected, rtol=2 ** -6, atol=2e-2)


def test_pdl_is_ignored_off_the_gpu():
    """Programmatic dependent launch is a CUDA launch setting: asked for on the CPU (the
    interpreter), the kernels run as without it."""
    x, w, b = _inputs(11, 1, 40, 200, torch.float32, True, False)
    assert torch.equal(gemv(x, w, b, block_k=64, split_k=2, pdl=True), gemv(x, w, b, block_k=64, split_k=2))
