"""precision = "bf16": bf16 hidden-layer products, fp32 everything that is kept or reduced, and a
logged fallback to fp32 where the processor has no bf16 matrix units."""

import logging

import pytest
import torch
from torch import nn

from mbpo_core import precision
from mbpo_core.config import ConfigError, make_config
from mbpo_core.ensemble import GaussianEnsemble, fit, make_optimizer
from mbpo_core.nets import BatchedMLP
from mbpo_core.sac import SAC

needs_bf16 = pytest.mark.skipif(not precision.bf16_matmul_supported("cpu"),
                                reason="this CPU has no bf16 matrix instructions")


def _pair(prec: str) -> tuple[BatchedMLP, BatchedMLP]:
    ref = BatchedMLP(2, 12, 5, 64, 3, nn.SiLU)
    for layer in ref.layers:
        layer.reset_glorot_uniform(torch.Generator().manual_seed(0))
    low = BatchedMLP(2, 12, 5, 64, 3, nn.SiLU, prec)
    low.load_state_dict(ref.state_dict())
    return ref, low


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@needs_bf16
def test_bf16_products_keep_fp32_weights_gradients_and_outputs():
    ref, low = _pair("bf16")
    x = torch.randn(2, 256, 12)
    y_ref, y_low = ref(x), low(x)
    assert y_low.dtype == torch.float32  # the output layer runs in fp32
    assert not torch.equal(y_ref, y_low), "the hidden products did not run in bf16"
    assert torch.allclose(y_low, y_ref, rtol=0.05, atol=0.05 * float(y_ref.detach().abs().mean()))
    y_ref.pow(2).mean().backward()
    y_low.pow(2).mean().backward()
    for p_ref, p_low in zip(ref.parameters(), low.parameters()):
        assert p_low.dtype == p_low.grad.dtype == torch.float32
        assert _cos(p_ref.grad, p_low.grad) > 0.99


def test_without_bf16_units_it_is_fp32_exactly_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(precision, "bf16_matmul_supported", lambda device_type: False)
    precision.matmul_dtype.cache_clear()
    try:
        ref, low = _pair("bf16")
        x = torch.randn(2, 32, 12)
        with caplog.at_level(logging.WARNING, logger="mbpo_core.precision"):
            assert torch.equal(low(x), ref(x))
            assert torch.equal(low(x), ref(x))
        lines = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
        assert len(lines) == 1 and "using fp32" in lines[0], lines
    finally:
        precision.matmul_dtype.cache_clear()


def test_fp32_is_the_default_and_bit_identical_to_plain_products():
    cfg = make_config("Hopper-v5")
    assert cfg.sac.precision == cfg.ensemble.precision == "fp32"
    ref, same = _pair("fp32")
    x = torch.randn(2, 16, 12)
    out = x
    for layer in ref.layers[:-1]:
        out = ref.act(torch.baddbmm(layer.bias, out, layer.weight))
    out = torch.baddbmm(ref.layers[-1].bias, out, ref.layers[-1].weight)
    assert torch.equal(same(x), out)


@pytest.mark.parametrize("key", ["sac.precision", "ensemble.precision"])
def test_an_unknown_precision_is_refused_naming_the_allowed_ones(key):
    with pytest.raises(ConfigError, match=rf"{key} = 'fp16' is not allowed; allowed: fp32, bf16"):
        make_config("Hopper-v5", [f"{key}=fp16"])
    with pytest.raises(ValueError, match="allowed fp32, bf16"):
        BatchedMLP(1, 2, 2, 4, 1, precision="half")


@needs_bf16
def test_sac_in_bf16_follows_fp32_on_the_same_batches():
    """Same initial weights and batches: the losses stay close over 40 updates, and the kept
    state (weights, Adam moments) is fp32."""
    runs = {}
    for prec in ("fp32", "bf16"):
        cfg = make_config("Hopper-v5", [f"sac.precision={prec}", "sac.hidden_size=64"])
        sac = SAC(11, 3, cfg.sac, torch.Generator().manual_seed(1))
        data = torch.Generator().manual_seed(2)
        stats = []
        for _ in range(40):
            obs, nxt = torch.randn(128, 11, generator=data), torch.randn(128, 11, generator=data)
            act = torch.rand(128, 3, generator=data) * 2 - 1
            rew = torch.randn(128, generator=data)
            stats.append(sac.update(obs, act, rew, nxt, torch.zeros(128), data))
        runs[prec] = (sac, torch.stack(stats))
    (_, s_ref), (low, s_low) = runs["fp32"], runs["bf16"]
    assert torch.isfinite(s_low).all()
    critic_ref, critic_low = s_ref[:, 0], s_low[:, 0]
    assert float(((critic_low - critic_ref).abs() / critic_ref.abs()).max()) < 0.1
    assert float((s_low[:, 2] - s_ref[:, 2]).abs().max()) < 1e-3  # alpha
    state = low.full_state_dict()
    assert all(v.dtype == torch.float32 for v in state["modules"].values())
    moments = [t for s in state["critic_opt"]["state"].values() for t in s.values()
               if torch.is_tensor(t) and t.is_floating_point()]
    assert moments and all(t.dtype == torch.float32 for t in moments)


@needs_bf16
def test_ensemble_in_bf16_fits_about_as_well_as_fp32():
    """A smooth nonlinear map, as dynamics are: bf16 products reach a holdout MSE close to fp32."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, 14, generator=g)
    w = torch.randn(14, 11, generator=g) / 4
    y = torch.cat([torch.sin(x @ w), (x[:, :1] * x[:, 1:2]) * 0.1], -1)
    mse = {}
    for prec in ("fp32", "bf16"):
        cfg = make_config("Hopper-v5", [f"ensemble.precision={prec}", "ensemble.hidden_size=64",
                                        "ensemble.max_epochs=20"]).ensemble
        model = GaussianEnsemble(11, 3, cfg, torch.Generator().manual_seed(4))
        res = fit(model, make_optimizer(model), x, y, torch.Generator().manual_seed(5))
        mse[prec] = res.elite_holdout_mse
    assert mse["bf16"] < 1.25 * mse["fp32"], mse


@pytest.mark.parametrize("prec", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_weights_cast_once_give_the_same_passes_and_gradients(prec):
    """A SAC update casts each net's weights once and runs several passes on them: the results
    and the weights' gradients are those of passes that each cast for themselves."""
    _, net = _pair(prec)
    x1, x2 = torch.randn(2, 64, 12), torch.randn(2, 64, 12)
    (net(x1).sum() + net(x2, detach=True).pow(2).sum()).backward()
    each = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    w = net.product_weights("cpu")
    assert (w[0][0].dtype == torch.bfloat16) == (prec == "bf16") and w[-1][0].dtype == torch.float32
    y1, y2 = net(x1, weights=w), net(x2, detach=True, weights=w)
    assert torch.equal(y1, net(x1)) and torch.equal(y2, net(x2))
    (y1.sum() + y2.pow(2).sum()).backward()
    for a, b in zip(each, (p.grad for p in net.parameters())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("prec", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_a_single_output_runs_as_multiply_and_sum_with_the_product_s_values(prec):
    """Q heads (one output) skip the batched GEMV: same values and gradients as the product,
    up to fp32 rounding, and the output stays fp32."""
    net = BatchedMLP(2, 14, 1, 64, 2, nn.ReLU, prec)
    for layer in net.layers:
        layer.reset_glorot_uniform(torch.Generator().manual_seed(1))
    with torch.no_grad():
        net.layers[-1].bias.fill_(0.3)
    x = torch.randn(2, 128, 14)
    hidden = x
    for w, b in net.product_weights("cpu")[:-1]:
        hidden = net.act(torch.baddbmm(b, hidden.to(w.dtype), w))
    last = net.layers[-1]
    ref = torch.baddbmm(last.bias, hidden.float(), last.weight)
    y = net(x)
    assert y.dtype == torch.float32 and y.shape == (2, 128, 1)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    g_ref = torch.autograd.grad(ref.pow(2).sum(), last.weight)[0]
    g = torch.autograd.grad(y.pow(2).sum(), last.weight)[0]
    assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-4)
