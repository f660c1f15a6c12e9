"""The VOLO model on its own: names, variants, shapes, modes, stochastic depth."""

import mindspore as ms
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

from workloads.volo import create_model, list_models, model_config

TIMM_NAMES = [
    "volo_d1_224", "volo_d1_384", "volo_d2_224", "volo_d2_384", "volo_d3_224", "volo_d3_448",
    "volo_d4_224", "volo_d4_448", "volo_d5_224", "volo_d5_448", "volo_d5_512",
]


def n_params(model) -> int:
    return sum(p.size for p in model.trainable_params())


def test_names_cover_timm_mindcv_and_tiny():
    names = set(list_models())
    assert set(TIMM_NAMES) <= names
    assert {f"volo_d{i}" for i in range(1, 6)} <= names
    assert "volo_tiny" in names


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        create_model("volo_d9")
    assert "volo_d9" in str(err.value)
    assert "volo_d1_224" in str(err.value) and "volo_tiny" in str(err.value)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match="drop_path"):
        create_model("volo_tiny", drop_path=0.1)


def test_mindcv_alias_is_the_224_variant():
    assert model_config("volo_d3") == model_config("volo_d3_224")
    assert model_config("volo_d5").img_size == 224


def test_d1_parameter_count_matches_timm_figure():
    # timm's volo_d1_224 has 26,632,040 parameters (test_model_reference checks all sizes live)
    with no_init_parameters():  # shapes only
        model = create_model("volo_d1")
    assert n_params(model) == 26_632_040


def test_forward_shape_in_both_modes(ms_mode):
    model = create_model("volo_tiny", num_classes=10)
    model.set_train(False)
    x = ms.Tensor(np.random.RandomState(0).randn(3, 3, 32, 32).astype(np.float32))
    out = model(x)
    assert out.shape == (3, 10)
    assert np.isfinite(out.asnumpy()).all()


def test_stochastic_depth_only_while_training():
    model = create_model("volo_tiny", num_classes=10, drop_path_rate=0.5)
    x = ms.Tensor(np.random.RandomState(1).randn(8, 3, 32, 32).astype(np.float32))
    model.set_train(False)
    np.testing.assert_array_equal(model(x).asnumpy(), model(x).asnumpy())
    model.set_train(True)
    # with half the transformer branches dropped at random, two passes must differ
    assert not np.allclose(model(x).asnumpy(), model(x).asnumpy())


def test_bad_geometry_is_rejected_with_the_field():
    with pytest.raises(ValueError, match="img_size"):
        create_model("volo_tiny", img_size=36)


def test_checkpoint_path_round_trip(tmp_path):
    model = create_model("volo_tiny", num_classes=10)
    path = tmp_path / "tiny.ckpt"
    ms.save_checkpoint(model, str(path))
    again = create_model("volo_tiny", num_classes=10, checkpoint_path=str(path))
    for (n1, p1), (n2, p2) in zip(model.parameters_and_names(), again.parameters_and_names()):
        assert n1 == n2
        np.testing.assert_array_equal(p1.asnumpy(), p2.asnumpy())
    with pytest.raises(ValueError, match="does not fit"):
        create_model("volo_tiny", num_classes=10, embed_dims=(64, 96, 96, 96), checkpoint_path=str(path))
    # built without random init (the checkpoint fills it): a key it lacks is still an error
    partial = [{"name": n, "data": p} for n, p in model.parameters_and_names() if n != "head.weight"]
    ms.save_checkpoint(partial, str(tmp_path / "partial.ckpt"))
    with pytest.raises(ValueError, match="missing head.weight"):
        create_model("volo_tiny", num_classes=10, checkpoint_path=str(tmp_path / "partial.ckpt"))
