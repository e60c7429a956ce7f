"""Per-sample gradient sketches: every method exact against a loop of backward() + dense projection;
Adam preconditioning, checkpoint loading, token-budget batching, determinism."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from spice_ray.models import add_lora
from spice_ray.sketch import (
    GradientSketcher,
    KroneckerProjection,
    ProjectionSpec,
    factor_dim,
    per_sample_loss,
)
from spice_ray.sketch.gradients import AdamMoments
from spice_ray.sketch.optimizer_state import (
    CheckpointMismatch,
    apply_weights,
    load_training_state,
)
from spice_ray.sketch.projection import choose_method
from spice_ray.sketch.worker import distortion, padding_fraction, token_budget_batches

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tiny_lora(family: str):
    torch.manual_seed(0)
    cls, cfg_cls = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    model = add_lora(cls(cfg_cls(**TINY)), r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], seed=1)
    # LoRA B starts at zero, which makes every lora_A gradient zero: move B off zero so the test
    # exercises both factors.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def ragged_batch(lengths: list[int], vocab: int = 97, seed: int = 0):
    """Right-padded batch; labels on the second half of each sequence (a 'response')."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    labels = torch.full((len(lengths), T), -100)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=gen)
        labels[i, n // 2 : n] = ids[i, n // 2 : n]
        mask[i, :n] = 1
    return ids, labels, mask


def loop_of_backward(model, ids, labels, mask, layers) -> list[dict[str, torch.Tensor]]:
    """The oracle: one backward per sample at batch size 1, no padding."""
    out = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n]).logits
        loss, _ = per_sample_loss(logits, labels[i : i + 1, :n])
        loss.sum().backward()
        out.append({name: m.weight.grad.detach().clone() for name, m in layers.items()})
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_per_sample_gradients_equal_loop_of_backward(family):
    model = tiny_lora(family).eval()
    ids, labels, mask = ragged_batch([5, 12, 9, 16])
    sketcher = GradientSketcher(model, dim=64, seed=3)
    batched = sketcher.per_sample_gradients(ids, labels, mask)
    oracle = loop_of_backward(model, ids, labels, mask, sketcher.layers)
    assert set(batched) == set(oracle[0]) and len(batched) == 12  # 3 modules × 2 layers × (A, B)
    for name, grads in batched.items():
        for i, ref_grads in enumerate(oracle):
            ref = ref_grads[name]
            assert ref.abs().max() > 0, name
            rel = (grads[i] - ref).norm() / ref.norm()
            assert rel <= 1e-5, (name, i, float(rel))


def test_sketch_equals_dense_projection_of_flat_gradient():
    model = tiny_lora("llama").eval()
    ids, labels, mask = ragged_batch([7, 11, 4], seed=1)
    sketcher = GradientSketcher(model, dim=48, seed=5)
    out = sketcher(ids, labels, mask)
    oracle = loop_of_backward(model, ids, labels, mask, sketcher.layers)
    for i, grads in enumerate(oracle):
        flat = torch.cat([grads[n].reshape(-1) for n in sketcher.layers])
        dense = torch.cat([sketcher.projection.dense(n) for n in sketcher.layers], dim=1)  # P = [P_1 | P_2 | …]
        expected = dense @ flat
        assert ((out.sketch[i] - expected).norm() / expected.norm()) <= 1e-5
        assert abs(float(out.grad_norm[i]) - float(flat.norm())) <= 1e-5 * float(flat.norm())
    # loss is the mean cross-entropy over the labelled tokens
    assert torch.all(out.n_loss_tokens == torch.tensor([4, 6, 2]))


def test_projection_preserves_inner_products_in_expectation():
    shapes = {"a": (6, 5)}
    dim = 64
    grams = []
    for seed in range(400):
        proj = KroneckerProjection(shapes, dim=dim, seed=seed)
        grams.append(proj.dense("a").T @ proj.dense("a"))
    mean = torch.stack(grams).mean(0)
    # each entry of one PᵀP has std ≈ 0.7 here; over 400 seeds the mean's std is ≈ 0.035
    assert (mean - torch.eye(30)).abs().max() < 0.2
    assert abs(float(mean.diagonal().mean()) - 1.0) < 0.03


def test_factor_dim():
    assert factor_dim(256) == (16, 16)
    assert factor_dim(8192) == (64, 128)
    assert factor_dim(7) == (1, 7)


# ---------------------------------------------------------------------------------------------
# every method against the reference: a loop of backward() + the dense structured projection


def dense_reference(sketcher, oracle):
    """(B, d) sketches and (B,) norms from per-sample gradients (dicts of layer → ∇W), densely projected."""
    names = sorted(sketcher.layers)
    dense = torch.cat([sketcher.projection.dense(n) for n in names], dim=1)  # P = [P_1 | P_2 | …]
    flat = torch.stack([torch.cat([g[n].reshape(-1) for n in names]) for g in oracle])
    return flat @ dense.T, flat.norm(dim=1)


def assert_close_rows(got, want, tol=1e-5):
    for i in range(want.shape[0]):
        rel = float((got[i] - want[i]).norm() / want[i].norm())
        assert rel <= tol, (i, rel)


@pytest.mark.parametrize("method", ["auto", "materialize", "factored"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_every_method_equals_dense_reference(method, family):
    model = tiny_lora(family).eval()
    ids, labels, mask = ragged_batch([6, 13, 9, 16], seed=2)
    sketcher = GradientSketcher(model, dim=96, seed=7, method=method)
    oracle = loop_of_backward(model, ids, labels, mask, sketcher.layers)
    want, norms = dense_reference(sketcher, oracle)
    for attention_mask in (mask, None):  # right padding: the plain causal mask is exact
        out = sketcher(ids, labels, attention_mask)
        assert_close_rows(out.sketch, want)
        torch.testing.assert_close(out.grad_norm, norms, rtol=1e-5, atol=0)


def full_weight_model():
    """Full weights of q_proj and down_proj trainable (no LoRA): the layers where factored pays."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in model.named_modules():
        if name.endswith(("q_proj", "down_proj")):
            m.weight.requires_grad_(True)
    return model.eval()


@pytest.mark.parametrize("method", ["materialize", "factored", "auto"])
@pytest.mark.parametrize("lengths", [[5, 12, 9], [40, 33, 47]])  # short: Gram norm; long: materialised norm
def test_full_weight_layers_every_method(method, lengths):
    model = full_weight_model()
    ids, labels, mask = ragged_batch(lengths, seed=3)
    sketcher = GradientSketcher(model, dim=64, seed=1, method=method)
    oracle = loop_of_backward(model, ids, labels, mask, sketcher.layers)
    want, norms = dense_reference(sketcher, oracle)
    out = sketcher(ids, labels)
    assert_close_rows(out.sketch, want)
    torch.testing.assert_close(out.grad_norm, norms, rtol=1e-5, atol=0)


def test_auto_picks_materialize_for_lora_and_factored_for_wide_layers():
    assert choose_method(8, 4096, 64, 128, tokens=512) == "materialize"  # lora_A of a 7B layer
    assert choose_method(4096, 8, 64, 128, tokens=512) == "materialize"  # lora_B
    assert choose_method(4096, 4096, 64, 128, tokens=512) == "factored"  # a full 7B projection


def test_lora_init_zero_B_skips_A_exactly():
    """LoRA B starts at zero: every lora_A gradient is exactly zero and those layers are skipped."""
    torch.manual_seed(0)
    model = add_lora(LlamaForCausalLM(LlamaConfig(**TINY)), r=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=1).eval()
    ids, labels, mask = ragged_batch([7, 11, 4], seed=4)
    sketcher = GradientSketcher(model, dim=64, seed=2)
    assert sketcher.zero_layers() == {n for n in sketcher.layers if "lora_A" in n}
    exact = sketcher.per_sample_gradients(ids, labels, mask)
    assert all(float(g.abs().max()) == 0.0 for n, g in exact.items() if "lora_A" in n)
    oracle = loop_of_backward(model, ids, labels, mask, sketcher.layers)
    want, norms = dense_reference(sketcher, oracle)
    out = sketcher(ids, labels)
    assert_close_rows(out.sketch, want)
    torch.testing.assert_close(out.grad_norm, norms, rtol=1e-5, atol=0)
    full = GradientSketcher(model, dim=64, seed=2, skip_zero_layers=False)
    torch.testing.assert_close(full(ids, labels).sketch, out.sketch, rtol=1e-6, atol=1e-9)


def random_moments(sketcher, step=5):
    gen = torch.Generator().manual_seed(9)
    shapes = {n: m.weight.shape for n, m in sketcher.layers.items()}
    m = {n: 1e-3 * torch.randn(s, generator=gen) for n, s in shapes.items()}
    v = {n: 1e-6 * torch.rand(s, generator=gen) for n, s in shapes.items()}
    return AdamMoments(step=step, beta1=0.9, beta2=0.999, eps=1e-8, exp_avg=m, exp_avg_sq=v)


def test_adam_preconditioning_matches_hand_computation():
    model = tiny_lora("llama").eval()
    ids, labels, mask = ragged_batch([6, 10, 8], seed=5)
    plain = GradientSketcher(model, dim=64, seed=3)
    moments = random_moments(plain)
    oracle = loop_of_backward(model, ids, labels, mask, plain.layers)
    plain.remove_hooks()
    sketcher = GradientSketcher(model, dim=64, seed=3, adam=moments)
    b1, b2, eps, t = 0.9, 0.999, 1e-8, moments.step + 1
    hand = []
    for grads in oracle:  # LESS's update with bias correction, written out
        upd = {}
        for n, g in grads.items():
            m1 = b1 * moments.exp_avg[n] + (1 - b1) * g
            v1 = b2 * moments.exp_avg_sq[n] + (1 - b2) * g**2
            upd[n] = (m1 / (1 - b1**t)) / (torch.sqrt(v1 / (1 - b2**t)) + eps)
        hand.append(upd)
    want, norms = dense_reference(sketcher, hand)
    out = sketcher(ids, labels)
    assert_close_rows(out.sketch, want, tol=1e-4)
    torch.testing.assert_close(out.grad_norm, norms, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="elementwise"):
        GradientSketcher(model, dim=64, seed=3, adam=moments, method="factored")


def test_adam_state_from_hugging_face_checkpoint(tmp_path):
    """optimizer.pt + adapter_model.safetensors (what the HF Trainer writes) → moments and weights."""
    model = tiny_lora("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.99), eps=1e-7)
    ids, labels, _ = ragged_batch([9, 9], seed=6)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    model.save_pretrained(tmp_path)  # adapter_model.safetensors
    fresh = tiny_lora("llama")
    state = load_training_state(tmp_path, fresh)
    assert (state.format, state.step, state.beta1, state.beta2, state.eps) == ("torch", 3, 0.8, 0.99, 1e-7)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for k, n in enumerate(names):
        torch.testing.assert_close(state.exp_avg[n], opt.state[params[k]]["exp_avg"])
        torch.testing.assert_close(state.exp_avg_sq[n], opt.state[params[k]]["exp_avg_sq"])
    assert apply_weights(fresh, state) == len(names)
    trained = dict(model.named_parameters())
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, trained[n])
    # the bare optimizer.pt file works too; a model with another LoRA rank does not match
    assert load_training_state(tmp_path / "optimizer.pt", fresh).step == 3
    torch.manual_seed(0)
    other = add_lora(LlamaForCausalLM(LlamaConfig(**TINY)), r=2, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], seed=1)
    with pytest.raises(CheckpointMismatch, match="does not match the model"):
        load_training_state(tmp_path / "optimizer.pt", other)
    with pytest.raises(CheckpointMismatch, match="no optimizer state found"):
        load_training_state(tmp_path.parent, fresh)


def test_token_budget_batches():
    gen = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(5, 400, (200,), generator=gen)]
    batches = token_budget_batches(lengths, 2048)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(len(b) * max(lengths[i] for i in b) <= 2048 for b in batches)
    fixed = [list(range(i, min(i + 8, 200))) for i in range(0, 200, 8)]  # unsorted batches of 8
    assert padding_fraction(lengths, batches) < 0.1 < padding_fraction(lengths, fixed)
    assert token_budget_batches([10, 5000, 20], 1000) == [[0, 2], [1]]  # too long: alone
    assert token_budget_batches([3, 2, 1], None, max_rows=2) == [[2, 1], [0]]


def test_distortion_of_an_exact_sketch_is_zero():
    g = torch.randn(6, 10, generator=torch.Generator().manual_seed(1)).numpy()
    rep = distortion(g, g)
    assert rep["norm_ratio_rel_error_max"] < 1e-12 and rep["pair_error_max"] < 1e-12
    assert rep["pearson_inner"] == pytest.approx(1.0)


def test_worker_sketches_do_not_depend_on_batch_order_or_budget(tiny_model_dir):
    import numpy as np
    import pyarrow as pa

    from spice_ray.config import ModelConfig, SketchConfig
    from spice_ray.sketch.worker import SketchWorker

    rows = [
        {"uid": f"{i:03d}", "messages": [{"role": "user", "content": f"Add {i} and {i * 7}." + " Why?" * (i % 6)},
                                         {"role": "assistant", "content": f"{i * 8}" + " ok" * (i % 4)}]}
        for i in range(14)
    ]
    results = []
    for seed, budget in ((0, 4096), (1, 64), (2, None)):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        table = pa.Table.from_pylist([rows[i] for i in order])
        worker = SketchWorker(
            str(tiny_model_dir), str(tiny_model_dir), ModelConfig().model_dump(),
            SketchConfig(dim=64, max_tokens_per_batch=budget).model_dump(), max_tokens=1024,
        )
        out = worker(table)
        assert out.column("uid").to_pylist() == [rows[i]["uid"] for i in order]  # input order kept
        by_uid = dict(zip(out.column("uid").to_pylist(), np.stack(out.column("sketch").to_numpy(zero_copy_only=False))))
        results.append(np.stack([by_uid[r["uid"]] for r in rows]))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-4, atol=1e-6)
    assert np.abs(results[0]).max() > 0


def test_projection_spec_is_a_pure_function():
    shapes = {"b": (4, 8), "a": (8, 4)}
    spec = KroneckerProjection(shapes, dim=32, seed=3).spec
    assert spec == ProjectionSpec.for_shapes(dict(reversed(shapes.items())), 32, 3)
    assert spec.layers == (("a", 8, 4), ("b", 4, 8)) and (spec.d_out, spec.d_in) == (4, 8)
    assert spec.digest() != ProjectionSpec.for_shapes(shapes, 32, 4).digest()


def test_sketch_spec_keys_the_cache(tiny_model_dir):
    """The cache key changes with what changes the numbers (seed, d, loss, LoRA), not with how they
    are computed (method, batching, workers)."""
    from spice_ray.config import load_config
    from spice_ray.sketch.stage import sketch_spec, spec_hash

    def key(*overrides):
        cfg = load_config(None, ["sketch.dim=64", *overrides])
        spec, projection = sketch_spec(cfg, model_path=str(tiny_model_dir), tokenizer_path=str(tiny_model_dir),
                                       model_fingerprint="fp", state_path=None)
        assert spec["projection"] == projection.to_dict()
        return spec_hash(spec)

    base = key()
    assert base == key("sketch.method=factored", "sketch.batch_size=3", "sketch.num_workers=4", "sketch.max_tokens_per_batch=99",
                       "model.target_lora.r=4", "model.target=builtin:tiny-qwen2")  # the target's settings are not the proxy's
    for change in ("sketch.seed=1", "sketch.dim=128", "sketch.loss=all", "model.proxy_lora.r=4", "corpus.max_tokens=64", "sketch.dtype=float16"):
        assert key(change) != base, change
    cfg = load_config(None, ["sketch.dim=64"])
    spec, projection = sketch_spec(cfg, model_path=str(tiny_model_dir), tokenizer_path=str(tiny_model_dir),
                                   model_fingerprint="fp", state_path=None)
    from spice_ray.sketch.worker import build_sketcher

    built = build_sketcher(str(tiny_model_dir), cfg.model, cfg.sketch, "cpu").projection.spec
    assert built == projection  # the driver's meta-device spec is the worker's
