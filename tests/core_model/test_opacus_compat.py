"""The model trains under Opacus: per-user gradients and clipped gradients equal brute force.

One user's whole sequence is one example. For every trainable parameter, Opacus' per-sample
gradient (``grad_sample``) must equal the gradient of that user's loss alone, and the clipped,
noise-free DP-SGD gradient must equal the brute-force mean of per-user gradients each clipped to
norm C (Abadi et al., CCS 2016, Algorithm 1).
"""

import pytest
import torch

from core_model.model import ModelConfig, SASRec

opacus = pytest.importorskip("opacus")

B, T, V = 4, 6, 11


def batch(loss: str):
    g = torch.Generator().manual_seed(3)
    inputs = torch.randint(1, V + 1, (B, T), generator=g)
    targets = torch.randint(1, V + 1, (B, T), generator=g)
    inputs[0, :2] = 0  # left padding
    targets[0, :2] = 0
    inputs[2, :4] = 0
    targets[2, :4] = 0
    neg = None
    if loss == "sampled":
        neg = torch.randint(1, V + 1, (B, 5), generator=g)
    elif loss == "bce":
        neg = torch.randint(1, V + 1, (B, T), generator=g)
    return inputs, targets, neg


def build(loss: str, tie: bool, attn_init: str = "normal", features: str = "", item_dim: int = 0,
          item_bias: bool = False) -> SASRec:
    torch.manual_seed(0)
    model = SASRec(ModelConfig(num_items=V, max_len=T, d_model=8, num_blocks=2, num_heads=2, item_dim=item_dim,
                               item_bias=item_bias,
                               dropout=0.0, loss=loss, num_negatives=5, tie_weights=tie,
                               attn_init=attn_init, attn_output_dropout=attn_init == "normal",
                               item_features="genres" if features else "", item_features_side=features or "both",
                               num_item_features=3 if features else 0))
    if features:  # public catalogue features: a fixed matrix, learned projections in and out
        matrix = torch.rand(V + 1, 3, generator=torch.Generator().manual_seed(5))
        matrix[0] = 0
        model.set_item_features(matrix)
    model.packed = False  # one row per user in every layer, as DP-SGD requires
    return model.double()


def brute_force(model: SASRec, inputs, targets, neg) -> list[dict[str, torch.Tensor]]:
    grads = []
    for b in range(B):
        model.zero_grad()
        _, loss = model(inputs[b:b + 1], targets[b:b + 1], None if neg is None else neg[b:b + 1])
        loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return grads


@pytest.mark.parametrize("loss,tie,attn_init,features,item_dim,item_bias", [
    (loss, tie, "normal", "", 0, False) for loss in ("ce", "sampled", "bce") for tie in (True, False)
] + [("ce", True, "xavier", "", 0, False)]  # the reference code's attention: xavier in-projection, no output dropout
  + [(loss, True, "normal", "both", 0, False) for loss in ("ce", "sampled", "bce")]  # model.item_features
  + [("ce", True, "normal", "input", 0, False)]  # model.item_features_side="input"
  + [(loss, tie, "normal", "", 3, False) for loss, tie in (("ce", True), ("sampled", True), ("bce", False))]  # item_dim
  + [("ce", True, "normal", "both", 3, False)]
  + [("ce", tie, "normal", "", dim, True) for tie, dim in ((True, 0), (False, 0), (True, 3))])  # model.item_bias
def test_per_user_gradients_match_brute_force(loss, tie, attn_init, features, item_dim, item_bias):
    model = build(loss, tie, attn_init, features, item_dim, item_bias)
    if item_bias:  # a bias away from zero, so that its gradient path is exercised
        with torch.no_grad():
            model.output.bias.uniform_(-1, 1)
    inputs, targets, neg = batch(loss)
    expected = brute_force(model, inputs, targets, neg)
    gsm = opacus.GradSampleModule(model, loss_reduction="mean")
    gsm.zero_grad()
    _, out = gsm(inputs, targets, neg)
    out.backward()
    checked = 0
    for name, p in model.named_parameters():
        want = torch.stack([g[name] for g in expected])  # (B, *shape)
        got = p.grad_sample
        assert got is not None, f"{name}: Opacus computed no per-user gradient"
        err = (got - want).norm() / want.norm().clamp(min=1e-30)
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
        checked += 1
    assert checked == len(list(model.parameters()))
    gsm._close()


@pytest.mark.parametrize("loss,features,item_dim", [("ce", "", 0), ("sampled", "", 0), ("ce", "both", 0), ("ce", "", 3)])
def test_clipped_noise_free_dp_gradient_matches_brute_force(loss, features, item_dim):
    clip = 0.05  # small enough that every user is clipped
    model = build(loss, tie=True, features=features, item_dim=item_dim)
    inputs, targets, neg = batch(loss)
    per_user = brute_force(model, inputs, targets, neg)
    norms = torch.stack([torch.sqrt(sum((g ** 2).sum() for g in u.values())) for u in per_user])
    assert (norms > clip).all()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expect = {n: sum(f * u[n] for f, u in zip(factors, per_user)) / B for n in per_user[0]}

    gsm = opacus.GradSampleModule(model, loss_reduction="mean")
    optimizer = opacus.optimizers.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                              noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=B)
    optimizer.zero_grad()
    _, out = gsm(inputs, targets, neg)
    out.backward()
    optimizer.pre_step()
    for name, p in model.named_parameters():
        err = (p.grad - expect[name]).norm() / expect[name].norm().clamp(min=1e-30)
        assert err < 1e-5, f"{name}: relative error {err:.2e}"
    gsm._close()
