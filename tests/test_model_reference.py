"""Our VOLO against timm's (the reference): parameters, logits and gradients on the same weights.

Needs the `test` extra (torch 2.14.1, torchvision 0.29.1, timm); CI installs it, so these run live.
"""

import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore.nn.utils import no_init_parameters

from workloads.volo import create_model
from workloads.volo.convert import map_state_dict

torch = pytest.importorskip("torch", reason="reference tests need: pip install -e '.[test]'")
timm = pytest.importorskip("timm")
from timm.models.volo import VOLO as TimmVOLO  # noqa: E402

pytestmark = pytest.mark.reference
TINY = dict(layers=(2, 2, 2, 1), embed_dims=(64, 128, 128, 128), num_heads=(2, 4, 4, 4),
            img_size=32, patch_size=4, stem_hidden_dim=32)


def timm_model(name: str, num_classes: int = 10):
    torch.manual_seed(0)
    if name == "volo_tiny":
        model = TimmVOLO(num_classes=num_classes, **TINY)
    else:
        model = timm.create_model(name, num_classes=num_classes)
    # random, non-trivial values everywhere the default init leaves constants
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        model.pos_embed.normal_(0, 0.5)
        model.cls_token.normal_(0, 0.5)
    return model.eval()


def ours_from(reference, name: str, num_classes: int = 10):
    with no_init_parameters():  # every value is loaded below
        model = create_model(name, num_classes=num_classes)
    target = {n: tuple(p.shape) for n, p in model.parameters_and_names()}
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    params = {k: ms.Parameter(ms.Tensor(v), name=k) for k, v in map_state_dict(state, target).items()}
    not_loaded, unused = ms.load_param_into_net(model, params, strict_load=True)
    assert not not_loaded and not unused
    return model


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_parameter_counts_equal_timm(size):
    name = f"volo_d{size}_224"
    # Shapes only: neither side fills in values (volo_d5's init takes ~30 s on each side).
    with torch.device("meta"):
        ref = timm.create_model(name)
    with no_init_parameters():
        ours = create_model(name)
    assert sum(p.size for p in ours.trainable_params()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name,res", [("volo_tiny", 32), ("volo_d1_224", 224)])
def test_logits_match_timm(ms_mode, name, res):
    ref = timm_model(name)
    ours = ours_from(ref, name)
    ours.set_train(False)
    x = np.random.RandomState(0).randn(2, 3, res, res).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    got = ours(ms.Tensor(x)).asnumpy()
    assert np.abs(got - expected).max() <= 1e-4, np.abs(got - expected).max()
    assert np.abs(expected).max() > 0.1  # a meaningful comparison, not two near-zero outputs


def test_gradients_match_timm(ms_mode):
    """Outlook attention's unfold/fold is hand-built: its backward must equal torch's too."""
    ref = timm_model("volo_tiny")
    ours = ours_from(ref, "volo_tiny")
    ours.set_train(False)  # BN uses running stats in both, so the graphs are identical
    rng = np.random.RandomState(2)
    x = rng.randn(2, 3, 32, 32).astype(np.float32)
    w = rng.randn(2, 10).astype(np.float32)

    out = ref(torch.from_numpy(x))
    (out * torch.from_numpy(w)).sum().backward()
    expected = {k: p.grad.numpy() for k, p in ref.named_parameters()}

    weights = ms.ParameterTuple(ours.trainable_params())
    def weighted_sum(xx, ww):
        return (ours(xx) * ww).sum()

    grad_fn = ms.value_and_grad(weighted_sum, None, weights)
    _, grads = grad_fn(ms.Tensor(x), ms.Tensor(w))
    by_name = {p.name: g.asnumpy() for p, g in zip(weights, grads)}
    state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    target = {n: tuple(p.shape) for n, p in ours.parameters_and_names()}
    names = map_state_dict(state, target)  # torch key order -> our names, same order
    checked = 0
    for torch_key, ours_key in zip(
        [k for k in state if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))],
        [k for k in names if not k.endswith(("moving_mean", "moving_variance"))],
    ):
        np.testing.assert_allclose(by_name[ours_key], expected[torch_key], atol=1e-4, rtol=1e-3,
                                   err_msg=ours_key)
        checked += 1
    assert checked == len(expected)
    assert np.abs(by_name["network.0.0.attn.v.weight"]).max() > 0  # outlook path carries gradient


def _save_reference(tmp_path, fmt: str):
    from safetensors.torch import save_file

    ref = timm_model("volo_tiny")
    if fmt == "safetensors":
        path = tmp_path / "tiny.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        path = tmp_path / "tiny.pth"
        torch.save({"state_dict": ref.state_dict(), "epoch": 3}, str(path))
    return ref, path


def run_convert(*args):
    return subprocess.run([sys.executable, "-m", "workloads.volo.convert", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_convert_cli_output_loads_strictly_and_matches(tmp_path, fmt):
    ref, src = _save_reference(tmp_path, fmt)
    out = tmp_path / "tiny.ckpt"
    proc = run_convert("--from-timm", src, "--model", "volo_tiny", "--to", out)
    assert proc.returncode == 0, proc.stderr
    model = create_model("volo_tiny", num_classes=10)
    not_loaded, unused = ms.load_param_into_net(model, ms.load_checkpoint(str(out)), strict_load=True)
    assert not not_loaded and not unused
    model.set_train(False)
    x = np.random.RandomState(3).randn(1, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    assert np.abs(model(ms.Tensor(x)).asnumpy() - expected).max() <= 1e-4


def test_convert_names_every_bad_key_and_writes_nothing(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm_model("volo_tiny").state_dict().items()}
    del state["network.0.0.attn.v.weight"]
    state["network.9.extra.weight"] = torch.zeros(3)
    state["head.bias"] = torch.zeros(11)
    src = tmp_path / "bad.safetensors"
    save_file(state, str(src))
    out = tmp_path / "bad.ckpt"
    proc = run_convert("--from-timm", src, "--model", "volo_tiny", "--to", out, "--num-classes", "10")
    assert proc.returncode == 2
    for key in ("network.0.0.attn.v.weight", "network.9.extra.weight", "head.bias"):
        assert key in proc.stderr
    assert not out.exists()
    assert list(tmp_path.glob(".convert-*")) == []
