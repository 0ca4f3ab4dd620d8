"""export.py: ONNX for deployment, checked against PyTorch."""
import json
import re

import numpy as np
import pytest
import torch

import resnet

from conftest import injected, one_line_error, run, run_here, says

pytestmark = pytest.mark.slow  # each test runs the scripts

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(trained_run, cifar_dir, tmp_path_factory):
    run_dir, _ = trained_run
    out = tmp_path_factory.mktemp("export") / "onnx" / "model.onnx"  # its folder is made for it
    # no --data-dir: the run trained on an absolute path, which its run folder noted
    proc = run_here("export.py", "--checkpoint", run_dir / "best.pth", "--output", out, "--images", "100",
                    cwd=tmp_path_factory.mktemp("elsewhere"))
    assert str(cifar_dir.resolve()) in proc.stdout
    return out, proc


def test_the_onnx_model_gives_the_checkpoints_logits_and_export_py_says_it_compared_them(exported, trained_run):
    out, proc = exported
    assert re.search(r"on 100 test pictures of .*: largest logit difference \S+ \(the largest logit is \S+\), "
                     r"top-1 the same on all", proc.stdout)
    model, _ = resnet.load_model(trained_run[0] / "best.pth")
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": images.numpy()})
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_the_onnx_model_takes_any_batch_size_and_describes_itself(exported):
    out, _ = exported
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        (logits,) = session.run(["logits"], {"input": np.zeros((n, 3, 32, 32), np.float32)})
        assert logits.shape == (n, 10)
    model = onnx.load(str(out))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["classes"][9] == "truck" and meta["image_size"] == 32 and len(meta["mean"]) == 3
    assert model.opset_import[0].version == 17
    assert "BatchNormalization" not in {node.op_type for node in model.graph.node}


def test_the_atc_command_for_ascend_is_printed(exported):
    out, proc = exported
    assert (f'atc --model={out} --framework=5 --output={out.with_suffix("")} '
            f'--input_shape="input:1,3,32,32" --soc_version=<soc_version>') in proc.stdout


def test_without_onnxruntime_export_says_what_to_install_in_one_line(trained_run, cifar_dir, tmp_path):
    run_dir, _ = trained_run
    env = injected(tmp_path, "import sys; sys.modules['onnxruntime'] = None")
    proc = run("export.py", "--checkpoint", run_dir / "best.pth", "--data-dir", cifar_dir, "--output",
               tmp_path / "m.onnx", cwd=tmp_path, env=env, check=False)
    assert "requirements-extra.txt" in one_line_error(proc)


def test_an_export_that_does_not_match_is_not_written(trained_run, cifar_dir, tmp_path):
    run_dir, _ = trained_run
    proc = run_here("export.py", "--checkpoint", run_dir / "best.pth", "--data-dir", cifar_dir, "--output",
                    tmp_path / "m.onnx", "--images", "20", "--tolerance", "1e-12", cwd=tmp_path, check=False)
    assert "nothing written" in one_line_error(proc)
    assert list(tmp_path.glob("m.onnx*")) == []


def test_an_output_that_cannot_be_written_is_one_line(trained_run, cifar_dir, tmp_path):
    run_dir, _ = trained_run
    (tmp_path / "a-file").write_text("")
    proc = run_here("export.py", "--checkpoint", run_dir / "best.pth", "--data-dir", cifar_dir, "--output",
                    tmp_path / "a-file" / "m.onnx", "--images", "20", cwd=tmp_path, check=False)
    assert says(one_line_error(proc), tmp_path / "a-file", "cannot make this folder", "is a file")


def test_an_output_in_a_folder_not_ours_to_write_in_is_one_line_naming_the_file(trained_run, cifar_dir, tmp_path,
                                                                                 monkeypatch):
    import errno
    import torch

    def refused(model, args, f, **kwargs):  # what the exporter meets in a folder of another user's
        raise PermissionError(errno.EACCES, "Permission denied", str(f))
    monkeypatch.setattr(torch.onnx, "export", refused)
    proc = run_here("export.py", "--checkpoint", trained_run[0] / "best.pth", "--data-dir", cifar_dir,
                    "--output", tmp_path / "m.onnx", "--images", "20", cwd=tmp_path, check=False)
    assert says(one_line_error(proc), tmp_path / "m.onnx", "Permission denied", "nothing written")
    assert list(tmp_path.iterdir()) == []


def test_an_output_that_is_a_folder_is_one_line_before_any_export(trained_run, cifar_dir, tmp_path):
    run_dir, _ = trained_run
    (tmp_path / "exports").mkdir()
    proc = run_here("export.py", "--checkpoint", run_dir / "best.pth", "--data-dir", cifar_dir, "--output",
                    tmp_path / "exports", "--images", "20", cwd=tmp_path, check=False)
    assert f"--output names the .onnx file, e.g. {tmp_path / 'exports' / 'model.onnx'}" in one_line_error(proc)
    assert list(tmp_path.iterdir()) == [tmp_path / "exports"] and list((tmp_path / "exports").iterdir()) == []


def test_an_output_that_is_not_an_onnx_file_is_refused_and_left_as_it_was(trained_run, cifar_dir, tmp_path):
    run_dir, _ = trained_run
    checkpoint = tmp_path / "best.pth"
    checkpoint.write_bytes((run_dir / "best.pth").read_bytes())
    proc = run_here("export.py", "--checkpoint", checkpoint, "--data-dir", cifar_dir, "--output", checkpoint,
                    "--images", "20", cwd=tmp_path, check=False)
    assert says(one_line_error(proc), checkpoint, "--output", tmp_path / "best.onnx", "nothing written")
    assert checkpoint.read_bytes() == (run_dir / "best.pth").read_bytes()
    assert list(tmp_path.iterdir()) == [checkpoint]


def test_exporting_before_any_training_says_to_train_first(tmp_path):
    proc = run_here("export.py", cwd=tmp_path, check=False)  # make export's runs/resnet18/best.pth is not there yet
    line = one_line_error(proc)
    assert "runs/resnet18/best.pth: no such checkpoint" in line and "train.py" in line and "--checkpoint" in line
    assert list(tmp_path.iterdir()) == []
