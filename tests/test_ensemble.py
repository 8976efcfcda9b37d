"""The vectorized ensemble: equal to E separate MLPs, and it learns a known nonlinear system."""

import math

import torch
from torch import nn

from mbpo_core import ensemble as ens
from mbpo_core.config import EnsembleConfig


def _cfg(**kw) -> EnsembleConfig:
    base = dict(ensemble_size=4, num_elites=2, hidden_size=16, num_hidden_layers=3,
                weight_decay=(1e-5, 1e-5, 1e-5, 1e-5))
    base.update(kw)
    return EnsembleConfig(**base)


def test_batched_forward_equals_separate_mlps():
    g = torch.Generator().manual_seed(0)
    model = ens.GaussianEnsemble(obs_dim=5, act_dim=2, cfg=_cfg(), generator=g)
    x = torch.randn(4, 33, 7, generator=g)
    mean, logvar = model(x)
    for e in range(4):
        layers = []
        for i, layer in enumerate(model.net.layers):
            lin = nn.Linear(layer.weight.shape[1], layer.weight.shape[2])
            with torch.no_grad():
                lin.weight.copy_(layer.weight[e].T)
                lin.bias.copy_(layer.bias[e, 0])
            layers.append(lin)
            if i < len(model.net.layers) - 1:
                layers.append(nn.SiLU())
        out = nn.Sequential(*layers)(x[e])
        m, raw = out.chunk(2, dim=-1)
        lv = model.max_logvar - nn.functional.softplus(model.max_logvar - raw)
        lv = model.min_logvar + nn.functional.softplus(lv - model.min_logvar)
        torch.testing.assert_close(mean[e], m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logvar[e], lv, rtol=1e-5, atol=1e-6)
    # a member subset runs only those members, with the same numbers
    sub_mean, _ = model(x[[2, 0]], torch.tensor([2, 0]))
    torch.testing.assert_close(sub_mean, mean[[2, 0]])


def test_logvar_is_soft_bounded():
    g = torch.Generator().manual_seed(1)
    model = ens.GaussianEnsemble(3, 1, _cfg(), g)
    _, logvar = model(1e3 * torch.randn(4, 100, 4, generator=g))
    assert (logvar <= model.max_logvar + 1e-3).all() and (logvar >= model.min_logvar - 1e-3).all()


def _system(n: int, g: torch.Generator):
    """A known nonlinear system: next = obs + 0.1 * sin(3 obs) * act, reward = cos(obs_0) - act^2."""
    obs = torch.rand(n, 2, generator=g) * 4 - 2
    act = torch.rand(n, 1, generator=g) * 2 - 1
    next_obs = obs + 0.1 * torch.sin(3 * obs) * act
    rew = torch.cos(obs[:, 0]) - act[:, 0] ** 2
    return obs, act, rew, next_obs


def test_ensemble_learns_nonlinear_system_and_picks_elites():
    g = torch.Generator().manual_seed(2)
    cfg = _cfg(hidden_size=64, num_hidden_layers=2, weight_decay=(1e-5,) * 3, max_epochs=300,
               patience=10, ensemble_size=3, num_elites=2)
    model = ens.GaussianEnsemble(2, 1, cfg, g)
    opt = ens.make_optimizer(model)
    obs, act, rew, next_obs = _system(3000, g)
    x, y = ens.make_training_data(obs, act, rew, next_obs)
    result = ens.fit(model, opt, x, y, g)
    # target variance is ~0.27 (reward) and ~0.003 (deltas); the fit must explain nearly all of it
    assert result.elite_holdout_mse < 2e-3, result
    assert len(result.holdout_mse) == 3
    elite_mse = sorted(result.holdout_mse)[:2]
    assert math.isclose(result.elite_holdout_mse, sum(elite_mse) / 2, rel_tol=1e-6)
    # fresh test data: rewards are predicted almost exactly; the tiny deltas (|d| ~ 0.03) are
    # learned more slowly, as the Gaussian NLL first explains them as noise (measured: 0.74x
    # the "nothing changes" baseline error after this short fit, 0.54x after 2,000 epochs)
    obs, act, rew, next_obs = _system(2000, g)
    x_norm = model.normalize(torch.cat([obs, act], -1)).expand(3, -1, -1)
    with torch.no_grad():
        mean, _ = model(x_norm)
    elite_delta = mean[model.elites, :, 1:].mean(0)
    baseline = (next_obs - obs).abs().mean()
    assert (obs + elite_delta - next_obs).abs().mean() < 0.85 * baseline
    r_hat, next_hat = model.sample_next(obs, act, g)
    assert (next_hat - next_obs).abs().mean() < 2 * baseline
    assert (r_hat - rew).abs().mean() < 0.1 * (rew - rew.mean()).abs().mean()


def test_early_stopping_stops_before_max_epochs():
    g = torch.Generator().manual_seed(3)
    cfg = _cfg(max_epochs=10_000, patience=2, improvement_threshold=0.5)
    model = ens.GaussianEnsemble(2, 1, cfg, g)
    x, y = ens.make_training_data(*_system(500, g))
    result = ens.fit(model, ens.make_optimizer(model), x, y, g)
    assert result.epochs < 100


def test_sample_next_uses_one_elite_per_sample():
    """With zero noise (min=max log-variance very low) each sample equals one elite's mean."""
    g = torch.Generator().manual_seed(4)
    model = ens.GaussianEnsemble(3, 1, _cfg(), g)
    with torch.no_grad():
        model.max_logvar.fill_(-30.0)
        model.min_logvar.fill_(-40.0)
    model.elites.copy_(torch.tensor([1, 3]))
    obs, act = torch.randn(300, 3, generator=g), torch.randn(300, 1, generator=g)
    rew, nxt = model.sample_next(obs, act, g)
    x = model.normalize(torch.cat([obs, act], -1)).expand(4, -1, -1)
    mean, _ = model(x)
    pred = torch.cat([mean[..., :1], obs + mean[..., 1:]], -1)  # [E, N, 4]
    got = torch.cat([rew[:, None], nxt], -1)
    err = (pred - got).abs().amax(-1)  # [E, N]
    match = err < 1e-4
    assert match[[1, 3]].any(0).all(), "every sample comes from an elite"
    assert not match[[0, 2]].all(0).any()
    assert match[1].sum() > 100 and match[3].sum() > 100, "both elites are used"


def test_weight_decay_in_adam_is_the_original_l2_loss_term():
    """Adam's coupled weight decay per layer gives the updates of the original's loss term
    wd/2 * sum(w^2) on each layer's weights (none on biases or log-variance bounds)."""
    g = torch.Generator().manual_seed(4)
    cfg = _cfg(weight_decay=(1e-2, 2e-2, 3e-2, 4e-2))  # large, so that a wrong decay shows
    model = ens.GaussianEnsemble(2, 1, cfg, g)
    ref = ens.GaussianEnsemble(2, 1, cfg, torch.Generator())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ref.load_state_dict(start)
    opt, ref_opt = ens.make_optimizer(model), torch.optim.Adam(ref.parameters(), lr=cfg.lr)
    x, y = ens.make_training_data(*_system(256, g))
    xb, yb = x.expand(4, -1, -1), y.expand(4, -1, -1)
    for _ in range(5):
        opt.zero_grad()
        ens.ensemble_loss(model, xb, yb).backward()
        opt.step()
        ref_opt.zero_grad()
        (ens.ensemble_loss(ref, xb, yb) + ref.weight_decay_loss()).backward()
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name
    # and the decay does act: without it the same steps end elsewhere
    plain = ens.GaussianEnsemble(2, 1, _cfg(weight_decay=(0.0,) * 4), torch.Generator())
    plain.load_state_dict(start)
    plain_opt = ens.make_optimizer(plain)
    for _ in range(5):
        plain_opt.zero_grad()
        ens.ensemble_loss(plain, xb, yb).backward()
        plain_opt.step()
    assert not torch.allclose(plain.net.layers[0].weight, model.net.layers[0].weight,
                              rtol=1e-5, atol=1e-7)


def test_an_optimizer_state_saved_before_the_decay_moved_into_adam_still_loads():
    g = torch.Generator().manual_seed(5)
    model = ens.GaussianEnsemble(2, 1, _cfg(), g)
    old = torch.optim.Adam(model.parameters(), lr=1e-3)  # the single group of earlier versions
    x, y = ens.make_training_data(*_system(128, g))
    ens.ensemble_loss(model, x.expand(4, -1, -1), y.expand(4, -1, -1)).backward()
    old.step()
    saved = old.state_dict()
    new = ens.make_optimizer(model)
    ens.load_optimizer_state(new, model, saved)
    for p in model.parameters():
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
        assert torch.equal(new.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])
    assert [g["weight_decay"] for g in new.param_groups] == [1e-5] * 4 + [0.0]
