"""resnet.py: the networks, their sizes, and checkpoints turned back into models."""
import ast
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import resnet
from tutorial_resnet import ResNet50 as TutorialResNet50


@pytest.mark.parametrize("arch", list(resnet.MODELS))
def test_every_architecture_maps_a_cifar_batch_to_one_logit_per_class(arch):
    model = resnet.build_model(arch, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_parameter_counts_match_the_tutorials():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(resnet.ResNet18()) == 11_173_962
    assert count(resnet.ResNet50()) == 23_520_842


def test_num_classes_sets_the_final_layer():
    assert resnet.build_model("resnet18", num_classes=100).linear.out_features == 100


def test_pooling_equals_the_tutorials_avg_pool_at_32x32_and_works_at_other_sizes():
    model = resnet.ResNet18().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.layer4(model.layer3(model.layer2(model.layer1(F.relu(model.bn1(model.conv1(x)))))))
        tutorial = model.linear(F.avg_pool2d(features, 4).view(2, -1))
        torch.testing.assert_close(model(x), tutorial)
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
        assert model(torch.randn(2, 3, 24, 24)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_folding_batchnorm_into_the_convolutions_gives_the_same_outputs(arch):
    torch.manual_seed(0)
    model = resnet.build_model(arch).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics unlike the defaults
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    model = model.double()  # in float64 the folding is exact to rounding far below any float32 effect
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        folded = resnet.fold_batchnorm(model)
        torch.testing.assert_close(folded(x), expected, rtol=1e-9, atol=1e-9)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_unknown_architecture_is_refused_by_name():
    with pytest.raises(ValueError, match="resnet18"):
        resnet.build_model("resnet19")


def test_a_state_dict_saved_by_the_resnet50_tutorial_loads_as_is():
    tutorial = TutorialResNet50()
    model, ckpt = resnet.read_checkpoint(tutorial.state_dict(), arch="resnet50")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), tutorial.eval()(x))


def test_prefixes_of_dataparallel_and_compile_are_removed():
    state = {"module._orig_mod.linear.weight": torch.zeros(1), "linear.bias": torch.zeros(1)}
    assert set(resnet.clean_state_dict(state)) == {"linear.weight", "linear.bias"}


@pytest.mark.parametrize("arch", resnet.MODELS)
def test_the_network_of_a_bare_state_dict_is_worked_out_from_its_keys(arch):
    _, ckpt = resnet.read_checkpoint(resnet.build_model(arch, num_classes=7).state_dict())
    assert ckpt["arch"] == arch and ckpt["num_classes"] == 7


def test_a_model_named_that_the_state_dict_does_not_hold_is_refused():
    with pytest.raises(resnet.CheckpointError, match="holds a resnet18, not a resnet50"):
        resnet.read_checkpoint(resnet.ResNet18().state_dict(), arch="resnet50")


def test_a_checkpoint_of_another_architecture_names_the_first_keys_that_differ():
    ckpt = {"arch": "resnet50", "model": resnet.ResNet18().state_dict()}
    with pytest.raises(resnet.CheckpointError, match="does not fit resnet50") as e:
        resnet.read_checkpoint(ckpt, source="r18.pth")
    message = str(e.value)
    assert "\n" not in message and "Error(s) in loading" not in message
    assert "r18.pth: does not fit resnet50: it lacks layer1.0.conv3.weight" in message
    assert "; its layer1.0.conv1.weight is [64, 64, 3, 3] where resnet50 has [64, 64, 1, 1]" in message


def test_a_state_dict_with_a_layer_too_many_or_too_few_names_it():
    state = resnet.ResNet18().state_dict()
    state["layer4.1.extra.weight"] = torch.zeros(3)
    del state["layer2.0.bn1.running_mean"]
    with pytest.raises(resnet.CheckpointError) as e:
        resnet.read_checkpoint({"arch": "resnet18", "model": state})
    assert "lacks layer2.0.bn1.running_mean" in str(e.value) and "has extra layer4.1.extra.weight" in str(e.value)


def saved(**changes):
    """A checkpoint as train.py writes it, with some of its description changed."""
    ckpt = resnet.checkpoint(resnet.ResNet18(), "resnet18", resnet.CIFAR10_CLASSES, [0.49, 0.48, 0.45],
                             [0.25, 0.24, 0.26], 32, "cifar10", 3, 61.5, {"epochs": 40})
    return {**ckpt, **changes}


def test_a_checkpoint_as_train_py_writes_it_is_read_with_its_own_description():
    _, ckpt = resnet.read_checkpoint(saved(), source="best.pth")
    assert ckpt["classes"] == resnet.CIFAR10_CLASSES and ckpt["image_size"] == 32 and ckpt["epoch"] == 3
    assert ckpt["std"] == [0.25, 0.24, 0.26] and "assumed" not in ckpt
    _, ckpt = resnet.read_checkpoint(saved(epoch=0, accuracy=None, args={}))  # a run stopped in its first epoch
    assert ckpt["accuracy"] is None


@pytest.mark.parametrize("key, value", [
    ("classes", ["airplane"]), ("classes", list(range(10))), ("classes", "airplane"), ("num_classes", 5),
    ("mean", "0.5"), ("mean", [0.5, 0.5]), ("mean", [0.5, float("nan"), 0.5]),
    ("std", [0.2, 0.0, 0.2]), ("std", [0.2, -0.2, 0.2]), ("std", [0.2, 0.2, 0.2, 0.2]),
    ("image_size", -3), ("image_size", 0), ("image_size", 32.0), ("image_size", 10 ** 6), ("image_size", True),
    ("dataset", 10), ("epoch", "one"), ("epoch", 2.5), ("accuracy", "high"), ("accuracy", float("inf")),
    ("args", "--epochs 40"), ("args", {"data_dir": 5})])
def test_a_description_that_does_not_fit_the_weights_or_the_format_is_refused_naming_the_key(key, value):
    # what the scripts would otherwise trip over later: a class list shorter than the outputs, a
    # std of 0 (every confidence NaN), a picture side of -3
    with pytest.raises(resnet.CheckpointError) as e:
        resnet.read_checkpoint(saved(**{key: value}), source="edited.pth")
    message = str(e.value)
    assert message.startswith(f"edited.pth: its '{key}' is ") and "\n" not in message


def weights(**changes):
    return {**resnet.ResNet18().state_dict(), **changes}


@pytest.mark.parametrize("ckpt, said", [
    (saved(model=5), "its 'model' should map the network's layer names to tensors, and does not"),
    (saved(model={}), "its 'model' should map the network's layer names to tensors, and does not"),
    (saved(model={1: torch.zeros(3)}), "its 'model' should map the network's layer names to tensors, and does not"),
    (saved(model=weights(**{"linear.weight": 5})), "its 'model' should map the network's layer names to tensors"),
    ({"net": {"linear.weight": [1.0]}, "acc": 90}, "its 'net' should map the network's layer names to tensors"),
    (saved(arch=["resnet18"]), "a network named ['resnet18'], which is none of resnet18, resnet34"),
    (saved(model=weights(**{"linear.weight": torch.tensor(1.0)})), "its linear.weight is [], where a final layer "
                                                                    "is [classes, features]"),
    (saved(model=weights(**{"layer3.1.bn2.running_var": torch.full((256,), float("nan"))})),
     "its layer3.1.bn2.running_var holds NaN or infinite values; take the checkpoint of an epoch before the run "
     "diverged"),
    (weights(**{"linear.bias": torch.full((10,), float("inf"))}), "its linear.bias holds NaN or infinite values")])
def test_weights_of_the_wrong_kind_or_that_diverged_are_refused_in_one_line(ckpt, said):
    # a file edited by hand or saved by other code: what predict.py, test.py, export.py and the window
    # would otherwise end with a traceback on, or answer NaN with
    with pytest.raises(resnet.CheckpointError) as e:
        resnet.read_checkpoint(ckpt, source="edited.pth")
    assert str(e.value).startswith(f"edited.pth: {said}") and "\n" not in str(e.value)


def test_checkpoints_load_with_weights_only(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"arch": "resnet18", "model": {}, "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(resnet.CheckpointError, match="evil.pth"):
        resnet.load_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_run_folder_named_as_the_checkpoint_points_at_its_best_pth(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(resnet.CheckpointError, match=r"empty: is a directory, not a checkpoint$"):
        resnet.load_checkpoint(tmp_path / "empty")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pth").write_bytes(b"")
    with pytest.raises(resnet.CheckpointError) as e:
        resnet.load_checkpoint(tmp_path / "run")
    assert str(e.value).endswith(f"not a checkpoint: name a .pth file, such as {tmp_path / 'run' / 'best.pth'}")


@pytest.mark.parametrize("name", ["resnet.py", "device.py"])
def test_resnet_py_and_device_py_import_only_torch_and_the_standard_library(name):
    # so either file can be copied alone into another project
    tree = ast.parse((Path(resnet.__file__).parent / name).read_text())
    modules = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules - set(sys.stdlib_module_names) <= {"torch", "torch_npu"}
    assert "torch" in modules
