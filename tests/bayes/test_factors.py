"""Tests of the output-side Hessians, the streaming estimator and the factor file format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from open_clip.loss import SigLipLoss
from torch.nn import functional as F  # noqa: N812

from annotator.bayes.factors import (
    FactorEstimator,
    KroneckerFactors,
    ProjectionFactors,
    clip_embedding_hessian,
    load_factors,
    save_factors,
    siglip_embedding_hessian,
)
from annotator.bayes.hessians import embedding_hessian_sum
from annotator.errors import FactorFormatError, InputError

from .helpers import random_spd

PUBLISHED = Path("/work/shared/data/bayesvlm-hessians/CLIP-ViT-B-32-laion2B-s34B-b79K")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _gauss_newton_reference(embedding, targets, loss_of_logits, logits_of_embedding):
    """Return ``J_zᵀ (∂²loss/∂z²) J_z`` for one embedding, all parts from autograd."""
    logits = logits_of_embedding(embedding)
    jacobian = torch.autograd.functional.jacobian(logits_of_embedding, embedding)  # (C, D)
    hessian_logits = torch.autograd.functional.hessian(loss_of_logits, logits)  # (C, C)
    return jacobian.T @ hessian_logits @ jacobian


def test_clip_hessian_matches_autograd_gauss_newton():
    generator = torch.Generator().manual_seed(0)
    embeddings = 3.0 * torch.randn(5, 6, generator=generator, dtype=torch.float64)
    targets = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    scale = 7.5

    hessians = clip_embedding_hessian(embeddings, targets, scale)

    for i, embedding in enumerate(embeddings):
        label = torch.tensor(i % 4)
        reference = _gauss_newton_reference(
            embedding,
            targets,
            lambda z, label=label: F.cross_entropy(z[None], label[None]),
            lambda g: scale * _normalize(g) @ _normalize(targets).T,
        )
        torch.testing.assert_close(hessians[i], reference, rtol=1e-10, atol=1e-12)


def test_clip_hessian_independent_of_label():
    generator = torch.Generator().manual_seed(1)
    embedding = torch.randn(6, generator=generator, dtype=torch.float64)
    targets = torch.randn(4, 6, generator=generator, dtype=torch.float64)

    def logits(g):
        return 5.0 * _normalize(g) @ _normalize(targets).T

    per_label = [
        _gauss_newton_reference(
            embedding,
            targets,
            lambda z, label=label: F.cross_entropy(z[None], torch.tensor([label])),
            logits,
        )
        for label in range(4)
    ]
    for hessian in per_label[1:]:
        torch.testing.assert_close(hessian, per_label[0], rtol=1e-10, atol=1e-12)


def test_siglip_hessian_matches_open_clip_loss():
    # open_clip's SigLipLoss is linear in the normalised image features through its logits,
    # so its exact Hessian with respect to one normalised image row is H_ĝ / N.
    generator = torch.Generator().manual_seed(2)
    batch = 4
    embeddings = 2.0 * torch.randn(batch, 6, generator=generator, dtype=torch.float64)
    texts = torch.randn(batch, 6, generator=generator, dtype=torch.float64)
    scale, bias = 10.0, -3.0
    loss = SigLipLoss()

    hessians = siglip_embedding_hessian(embeddings, texts, scale, bias)

    unit = _normalize(embeddings)
    for i in range(batch):

        def loss_of_row(row, i=i):
            rows = torch.cat([unit[:i], row[None], unit[i + 1 :]])
            return loss(rows, _normalize(texts), scale, bias)

        hessian_unit = torch.autograd.functional.hessian(loss_of_row, unit[i]) * batch
        norm = embeddings[i].norm()
        jacobian = (torch.eye(6, dtype=torch.float64) - torch.outer(unit[i], unit[i])) / norm
        torch.testing.assert_close(
            hessians[i], jacobian @ hessian_unit @ jacobian, rtol=1e-9, atol=1e-12
        )


def test_siglip_hessian_matches_autograd_gauss_newton():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    targets = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    scale, bias = 4.0, 1.5
    signs = torch.where(torch.rand(7, generator=generator) < 0.5, -1.0, 1.0).double()

    hessians = siglip_embedding_hessian(embeddings, targets, scale, bias)

    for i, embedding in enumerate(embeddings):
        reference = _gauss_newton_reference(
            embedding,
            targets,
            lambda z: -F.logsigmoid(signs * z).sum(),
            lambda g: scale * _normalize(g) @ _normalize(targets).T + bias,
        )
        torch.testing.assert_close(hessians[i], reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_hessian_sum_equals_per_sample_sum(loss, device):
    generator = torch.Generator().manual_seed(4)
    embeddings = torch.randn(9, 8, generator=generator, dtype=torch.float64).to(device)
    targets = torch.randn(5, 8, generator=generator, dtype=torch.float64).to(device)
    if loss == "clip":
        per_sample = clip_embedding_hessian(embeddings, targets, 6.0)
    else:
        per_sample = siglip_embedding_hessian(embeddings, targets, 6.0, -2.0)

    summed = embedding_hessian_sum(embeddings, targets, loss, 6.0, -2.0)

    assert summed.device == embeddings.device
    torch.testing.assert_close(summed, per_sample.sum(0), rtol=1e-10, atol=1e-12)


def test_clip_hessian_symmetric_psd_radial_null():
    generator = torch.Generator().manual_seed(5)
    embeddings = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    targets = torch.randn(5, 8, generator=generator, dtype=torch.float64)

    hessians = clip_embedding_hessian(embeddings, targets, 3.0)

    torch.testing.assert_close(hessians, hessians.transpose(1, 2))
    assert float(torch.linalg.eigvalsh(hessians).min()) > -1e-12
    # Scaling g does not change the loss, so g is in the null space of H.
    radial = torch.einsum("nde,ne->nd", hessians, embeddings)
    assert float(radial.abs().max()) < 1e-12


def test_hessian_rejects_zero_embedding():
    embeddings = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="all-zero row"):
        clip_embedding_hessian(embeddings, torch.ones(2, 3, dtype=torch.float64), 1.0)


def test_hessian_sum_requires_siglip_bias():
    embeddings = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="logit_bias"):
        embedding_hessian_sum(embeddings, embeddings, "siglip", 1.0)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_estimator_pairs_match_reference(loss, device):
    generator = torch.Generator().manual_seed(6)
    batches = []
    for size in (5, 3):
        batches.append(
            (
                torch.randn(size, 7, generator=generator, dtype=torch.float64).to(device),
                torch.randn(size, 4, generator=generator, dtype=torch.float64).to(device),
                torch.randn(size, 6, generator=generator, dtype=torch.float64).to(device),
                torch.randn(size, 4, generator=generator, dtype=torch.float64).to(device),
            )
        )
    scale, bias = 5.0, -1.0
    estimator = FactorEstimator(loss, logit_scale=scale, logit_bias=bias)

    for image_features, image_embeddings, text_features, text_embeddings in batches:
        estimator.update(
            image_features,
            image_embeddings,
            text_features=text_features,
            text_embeddings=text_embeddings,
        )
    factors = estimator.finalize(image_prior_precision=2.0, text_prior_precision=3.0)

    def hessians(embeddings, targets):
        if loss == "clip":
            return clip_embedding_hessian(embeddings, targets, scale)
        return siglip_embedding_hessian(embeddings, targets, scale, bias)

    phi = torch.cat([batch[0] for batch in batches])
    psi = torch.cat([batch[2] for batch in batches])
    image_hessians = torch.cat([hessians(b[1], b[3]) for b in batches])
    text_hessians = torch.cat([hessians(b[3], b[1]) for b in batches])
    assert factors.text is not None
    torch.testing.assert_close(factors.image.A, phi.T @ phi / 8)
    torch.testing.assert_close(factors.image.B, image_hessians.mean(0))
    torch.testing.assert_close(factors.text.A, psi.T @ psi / 8)
    torch.testing.assert_close(factors.text.B, text_hessians.mean(0))
    assert factors.image.n == 8.0
    assert factors.image.prior_precision == 2.0
    assert factors.text.prior_precision == 3.0
    assert factors.image.A.device.type == device.type


def test_estimator_images_only_no_text():
    generator = torch.Generator().manual_seed(7)
    features = torch.randn(6, 5, generator=generator)
    embeddings = torch.randn(6, 3, generator=generator)
    prompts = torch.randn(4, 3, generator=generator)
    estimator = FactorEstimator("clip", logit_scale=10.0)

    estimator.update(features, embeddings, class_embeddings=prompts)
    factors = estimator.finalize(num_data=100.0)

    reference = clip_embedding_hessian(embeddings.double(), prompts.double(), 10.0).mean(0)
    assert factors.text is None
    assert factors.image.A.dtype == torch.float64
    assert factors.image.n == 100.0
    torch.testing.assert_close(factors.image.B, reference)


def test_estimator_rejects_mixed_or_missing_batches():
    features = torch.ones(2, 3)
    estimator = FactorEstimator("clip", logit_scale=1.0)
    with pytest.raises(InputError, match="either"):
        estimator.update(features, features)
    with pytest.raises(InputError, match="either"):
        estimator.update(
            features,
            features,
            text_features=features,
            text_embeddings=features,
            class_embeddings=features,
        )
    with pytest.raises(InputError, match="update"):
        estimator.finalize()


def test_estimator_rejects_width_change():
    estimator = FactorEstimator("clip", logit_scale=1.0)
    estimator.update(torch.randn(2, 3), torch.randn(2, 4), class_embeddings=torch.randn(3, 4))
    with pytest.raises(InputError, match="earlier batches"):
        estimator.update(torch.randn(2, 5), torch.randn(2, 4), class_embeddings=torch.randn(3, 4))


def test_damped_factors_formula():
    generator = torch.Generator().manual_seed(8)
    A = random_spd(4, generator=generator)
    B = random_spd(3, generator=generator)
    factors = KroneckerFactors(A=A, B=B, n=9.0, prior_precision=16.0)

    A_damped, B_damped = factors.damped()

    torch.testing.assert_close(A_damped, 3.0 * A + 4.0 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(B_damped, 3.0 * B + 4.0 * torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize(
    "field,value", [("n", 0.0), ("prior_precision", -1.0), ("n", float("nan"))]
)
def test_factors_reject_invalid_scalars(field, value):
    arguments = {"A": torch.eye(2), "B": torch.eye(2), "n": 1.0, "prior_precision": 1.0}
    arguments[field] = value
    with pytest.raises(InputError, match=field):
        KroneckerFactors(**arguments)


def test_save_load_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(9)
    factors = ProjectionFactors(
        image=KroneckerFactors(
            A=random_spd(5, generator=generator),
            B=random_spd(3, generator=generator),
            n=2.0,
            prior_precision=30.0,
        ),
        text=KroneckerFactors(
            A=random_spd(4, generator=generator),
            B=random_spd(3, generator=generator),
            n=3.0,
            prior_precision=40.0,
        ),
    )

    save_factors(factors, tmp_path / "factors", dtype=torch.float64)
    loaded = load_factors(tmp_path / "factors", image_shape=(5, 3), text_shape=(4, 3))

    assert loaded.text is not None
    torch.testing.assert_close(loaded.image.A, factors.image.A)
    torch.testing.assert_close(loaded.text.B, factors.text.B)
    assert loaded.image.prior_precision == 30.0
    assert loaded.text.n == 3.0
    prior = json.loads((tmp_path / "factors" / "prior_precision_analytic.json").read_text())
    assert set(prior) == {"n_img", "lambda_img", "n_txt", "lambda_txt"}


def test_save_load_without_text_side(tmp_path):
    factors = ProjectionFactors(
        image=KroneckerFactors(A=torch.eye(3), B=torch.eye(2), n=1.0, prior_precision=1.0)
    )
    save_factors(factors, tmp_path)

    loaded = load_factors(tmp_path)

    assert loaded.text is None
    assert not (tmp_path / "A_txt_analytic.pt").exists()
    with pytest.raises(FactorFormatError, match="A_txt_analytic.pt is missing"):
        load_factors(tmp_path, text_shape=(3, 2))


def test_load_reports_shape_mismatch_with_file(tmp_path):
    factors = ProjectionFactors(
        image=KroneckerFactors(A=torch.eye(3), B=torch.eye(2), n=1.0, prior_precision=1.0)
    )
    save_factors(factors, tmp_path)

    with pytest.raises(FactorFormatError, match=r"A_img_analytic.pt has shape \(3, 3\).*\(4, 4\)"):
        load_factors(tmp_path, image_shape=(4, 2))
    with pytest.raises(FactorFormatError, match=r"B_img_analytic.pt has shape \(2, 2\).*\(5, 5\)"):
        load_factors(tmp_path, image_shape=(3, 5))


def test_load_reports_missing_files(tmp_path):
    with pytest.raises(FactorFormatError, match="does not exist"):
        load_factors(tmp_path / "absent")
    with pytest.raises(FactorFormatError, match="prior_precision_analytic.json is missing"):
        load_factors(tmp_path)
    (tmp_path / "prior_precision_analytic.json").write_text('{"n_img": 1, "lambda_img": 2}')
    with pytest.raises(FactorFormatError, match="A_img_analytic.pt is missing"):
        load_factors(tmp_path)


def test_load_reports_bad_prior_file(tmp_path):
    factors = ProjectionFactors(
        image=KroneckerFactors(A=torch.eye(3), B=torch.eye(2), n=1.0, prior_precision=1.0)
    )
    save_factors(factors, tmp_path)
    prior_path = tmp_path / "prior_precision_analytic.json"

    prior_path.write_text('{"n_img": 1}')
    with pytest.raises(FactorFormatError, match="lambda_img"):
        load_factors(tmp_path)
    prior_path.write_text('{"n_img": 1, "lambda_img": -5}')
    with pytest.raises(FactorFormatError, match="greater than 0"):
        load_factors(tmp_path)
    prior_path.write_text("not json")
    with pytest.raises(FactorFormatError, match="not valid JSON"):
        load_factors(tmp_path)


def test_load_rejects_one_text_file(tmp_path):
    factors = ProjectionFactors(
        image=KroneckerFactors(A=torch.eye(3), B=torch.eye(2), n=1.0, prior_precision=1.0),
        text=KroneckerFactors(A=torch.eye(3), B=torch.eye(2), n=1.0, prior_precision=1.0),
    )
    save_factors(factors, tmp_path)
    (tmp_path / "B_txt_analytic.pt").unlink()

    with pytest.raises(FactorFormatError, match="B_txt_analytic.pt is missing"):
        load_factors(tmp_path)


def test_load_rejects_non_tensor_file(tmp_path):
    factors = ProjectionFactors(
        image=KroneckerFactors(A=torch.eye(3), B=torch.eye(2), n=1.0, prior_precision=1.0)
    )
    save_factors(factors, tmp_path)
    torch.save({"A": torch.eye(3)}, tmp_path / "A_img_analytic.pt")

    with pytest.raises(FactorFormatError, match="plain tensor"):
        load_factors(tmp_path)


def test_published_vit_b32_factors_load():
    if not PUBLISHED.is_dir():
        pytest.skip(f"published ViT-B-32 factors not found at {PUBLISHED}")

    factors = load_factors(PUBLISHED, image_shape=(768, 512), text_shape=(512, 512))

    assert factors.text is not None
    assert tuple(factors.image.A.shape) == (768, 768)
    assert tuple(factors.image.B.shape) == (512, 512)
    assert tuple(factors.text.A.shape) == (512, 512)
    assert tuple(factors.text.B.shape) == (512, 512)
    assert factors.image.A.dtype == torch.float64
    torch.testing.assert_close(factors.image.B, factors.image.B.T, rtol=0, atol=0)
    for side in (factors.image, factors.text):
        A_damped, B_damped = side.damped()
        # A Cholesky factorisation exists exactly when the matrix is positive definite.
        assert int(torch.linalg.cholesky_ex(A_damped).info) == 0
        assert int(torch.linalg.cholesky_ex(B_damped).info) == 0
