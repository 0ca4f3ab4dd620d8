"""test.py: evaluating a checkpoint on the test split."""
import pytest
import re

import torch

import data
import resnet
from conftest import QUICK, one_line_error, run_here, write_cifar100, says
from test_tutorials import load_script

pytestmark = pytest.mark.slow  # each test runs the scripts


def direct_accuracy(checkpoint, cifar_dir, tta=False, norm=None):
    """Accuracy computed by hand: normalize with the checkpoint's numbers (or norm: (mean, std)),
    forward, compare (tta: the mean of the logits of each image and its mirror image)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = resnet.build_model(ckpt["arch"], ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])
    images, labels, _ = data.load_split(cifar_dir, train=False)
    mean, std = norm or (ckpt["mean"], ckpt["std"])
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    with torch.no_grad():
        logits = model.eval()(x)
        predicted = (logits + model(x.flip(3)) if tta else logits).argmax(1)
    return 100.0 * (predicted == labels).sum().item() / len(labels), predicted, labels


def test_accuracy_equals_a_direct_computation(trained_run, cifar_dir):
    run_dir, _ = trained_run
    proc = run_here("test.py", "--checkpoint", run_dir / "best.pth", "--data-dir", cifar_dir, "--device", "cpu",
                    "--amp", "off", cwd=run_dir)
    reported = float(re.search(r"^accuracy (\S+)% \((\d+)/100\)", proc.stdout, re.M).group(1))
    expected, _, _ = direct_accuracy(run_dir / "best.pth", cifar_dir)
    assert " in fp32" in proc.stdout
    assert reported == round(expected, 2)


def test_bf16_scores_within_a_picture_or_two_of_fp32_and_says_so(trained_run, cifar_dir):
    run_dir, _ = trained_run
    proc = run_here("test.py", "--checkpoint", run_dir / "best.pth", "--data-dir", cifar_dir, "--device", "cpu",
                    "--amp", "bf16", cwd=run_dir)
    reported = float(re.search(r"^accuracy (\S+)% \((\d+)/100\)", proc.stdout, re.M).group(1))
    assert " in bf16" in proc.stdout
    assert abs(reported - direct_accuracy(run_dir / "best.pth", cifar_dir)[0]) <= 2


def test_tta_scores_each_image_together_with_its_mirror_image(trained_run, cifar_dir):
    run_dir, _ = trained_run
    proc = run_here("test.py", "--checkpoint", run_dir / "best.pth", "--data-dir", cifar_dir, "--device", "cpu",
                    "--tta", "--amp", "off", cwd=run_dir)
    reported = float(re.search(r"^accuracy (\S+)% \((\d+)/100\)", proc.stdout, re.M).group(1))
    assert "with flip TTA" in proc.stdout
    assert reported == round(direct_accuracy(run_dir / "best.pth", cifar_dir, tta=True)[0], 2)


def test_per_class_accuracy_and_the_confusion_matrix_are_printed_with_class_names(trained_run, cifar_dir):
    run_dir, _ = trained_run
    proc = run_here("test.py", "--checkpoint", run_dir / "best.pth", "--data-dir", cifar_dir, "--device", "cpu",
                    cwd=run_dir)
    _, predicted, labels = direct_accuracy(run_dir / "best.pth", cifar_dir)
    truck = ((predicted == 9) & (labels == 9)).sum().item()
    assert re.search(rf"truck +\d+\.\d\d%  \({truck}/10\)", proc.stdout)
    table = proc.stdout.split("confusion matrix")[1].splitlines()[1:12]
    assert table[0].split() == ["airpl", "autom", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    rows = {ln.split()[0]: [int(v) for v in ln.split()[1:]] for ln in table[1:]}
    assert sum(rows["airplane"]) == 10 and rows["truck"][9] == truck


def test_the_confusion_table_stays_aligned_with_chinese_class_names():
    # a Chinese character takes two columns of a terminal
    table = load_script("test").format_confusion(torch.tensor([[12, 0], [3, 9]]), ["猫", "飞机"])
    assert table.splitlines() == ["        猫  飞机",
                                  "  猫    12     0",
                                  "飞机     3     9"]


def test_the_per_class_lines_keep_one_column_for_names_long_or_chinese():
    lines = load_script("test").format_per_class(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]),
                                                 ["猫", "a_long_folder_name", "ship"]).splitlines()
    assert lines == ["                  猫  75.00%  (3/4)",
                     "  a_long_folder_name 100.00%  (2/2)",
                     "                ship   0.00%  (0/0)"]


def test_the_run_remembers_its_data_folder(trained_run, cifar_dir, tmp_path):
    # trained_run used an absolute --data-dir: the run folder notes it, the shareable checkpoint does not
    run_dir, _ = trained_run
    assert (run_dir / "data_dir.txt").read_text().strip() == str(cifar_dir.resolve())
    proc = run_here("test.py", "--checkpoint", run_dir / "best.pth", "--device", "cpu", cwd=tmp_path)
    expected, _, _ = direct_accuracy(run_dir / "best.pth", cifar_dir)
    assert f"accuracy {expected:.2f}% (" in proc.stdout and str(cifar_dir.resolve()) in proc.stdout
    # a checkpoint copied elsewhere, without its run folder, asks for the data folder
    (tmp_path / "shared.pth").write_bytes((run_dir / "best.pth").read_bytes())
    line = one_line_error(run_here("test.py", "--checkpoint", "shared.pth", "--device", "cpu", cwd=tmp_path,
                                   check=False))
    assert "--data-dir" in line


def test_a_bare_state_dict_is_evaluated_as_the_tutorials_normalize_and_says_so(trained_run, cifar_dir, tmp_path):
    run_dir, _ = trained_run
    ckpt = torch.load(run_dir / "best.pth", weights_only=True)
    torch.save(ckpt["model"], tmp_path / "bare.pth")  # what the tutorials save
    proc = run_here("test.py", "--checkpoint", tmp_path / "bare.pth", "--data-dir", cifar_dir, "--device", "cpu",
                    "--amp", "off", cwd=tmp_path)
    expected, _, _ = direct_accuracy(run_dir / "best.pth", cifar_dir, norm=(resnet.TUTORIAL_MEAN, resnet.TUTORIAL_STD))
    assert f"accuracy {expected:.2f}%" in proc.stdout
    note = proc.stderr.strip().splitlines()
    assert len(note) == 1 and "bare.pth" in note[0] and "(0.2023, 0.1994, 0.201)" in note[0]


def test_no_checkpoint_or_a_file_that_is_not_one_is_a_one_line_error(tmp_path, cifar_dir):
    proc = run_here("test.py", "--data-dir", cifar_dir, cwd=tmp_path, check=False)  # make eval before make train
    line = one_line_error(proc)
    assert "runs/resnet18/best.pth: no such checkpoint" in line and "train.py" in line and "--checkpoint" in line
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    proc = run_here("test.py", "--checkpoint", tmp_path / "notes.pth", "--data-dir", cifar_dir, cwd=tmp_path,
                    check=False)
    assert "notes.pth" in one_line_error(proc)


def test_a_checkpoint_of_other_classes_than_the_data_s_is_refused_naming_both(trained_run, cifar_dir, tmp_path):
    run_dir, _ = trained_run
    ckpt = torch.load(run_dir / "best.pth", weights_only=True)  # as if trained on a folder of ten other classes
    torch.save({**ckpt, "classes": [f"kind{i}" for i in range(10)]}, tmp_path / "folder.pth")
    proc = run_here("test.py", "--checkpoint", tmp_path / "folder.pth", "--dataset", "cifar10", "--data-dir",
                    cifar_dir, cwd=tmp_path, check=False)
    assert says(one_line_error(proc), tmp_path / "folder.pth", "kind0, kind1", cifar_dir, "airplane, automobile")


def test_a_tutorial_s_cifar_100_weights_name_no_classes_and_are_scored_on_cifar_100(tmp_path):
    root = write_cifar100(tmp_path / "data", n_train=10, n_test=20)
    torch.save(resnet.build_model("resnet18", 100).state_dict(), tmp_path / "net_100.pth")
    proc = run_here("test.py", "--checkpoint", tmp_path / "net_100.pth", "--dataset", "cifar100", "--data-dir", root,
                    "--device", "cpu", cwd=tmp_path)
    assert re.search(r"accuracy \d+\.\d\d% \(\d+/20\)", proc.stdout)


def test_training_with_tta_logs_what_test_py_tta_reports_for_that_epoch(tmp_path, cifar_dir):
    run_here("train.py", "--data-dir", cifar_dir, "--epochs", "1", "--tta", *QUICK, cwd=tmp_path)
    logged = (tmp_path / "runs" / "resnet18" / "acc.txt").read_text().split("= ")[1].strip()
    proc = run_here("test.py", "--checkpoint", "runs/resnet18/net_001.pth", "--data-dir", cifar_dir, "--device", "cpu",
                    "--subset", "16", "--tta", cwd=tmp_path)
    assert re.search(r"^accuracy (\S+)%", proc.stdout, re.M).group(1) == f"{float(logged[:-1]):.2f}"
