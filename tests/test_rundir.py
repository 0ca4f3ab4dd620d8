"""rundir.py: files written whole or not at all, checkpoints written off the training path in
order with last.pth last, a failed write that surfaces in the training thread, the logs cut
back on resume, and the run's data folder noted in the run folder."""
import argparse
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import cli
import optim
import resnet
import resume
import rundir
import train
from conftest import says


def training(model):
    """train.py's Training of a model, with the default recipe."""
    return optim.make_training(model, train.get_args_parser().parse_args([]), torch.device("cpu"), None, 10)


def restore(checkpoint, model=None, steps=10, classes=resnet.CIFAR10_CLASSES):
    """resume.restore of a checkpoint into a new Training, as train.py does once the plan is made."""
    plan = resume.Plan(Path(checkpoint), resume.load(checkpoint))
    return resume.restore(training(model or resnet.build_model("resnet18")), plan, steps, classes,
                          Path(checkpoint).parent)


def epoch(folder, number, accuracy, is_best, built=None, best=None):
    """Hand epoch `number` to the folder; best: (accuracy, epoch) the best so far, if not this one."""
    model = resnet.build_model("resnet18")
    best_accuracy, best_epoch = best or (accuracy, number)

    def checkpoint():
        if built is not None:
            built.append(number)
        return resnet.checkpoint(model, "resnet18", resnet.CIFAR10_CLASSES, (0.5,) * 3, (0.25,) * 3, 32, "cifar10",
                                 number, accuracy, {}, best_accuracy=best_accuracy, best_epoch=best_epoch)

    folder.save_epoch(checkpoint, training(model), is_best,
                      [str(number), "1.0", "50.0", "1.0", f"{accuracy:.3f}", "0.1", "1.0", "100.0"])


def test_an_epoch_is_written_in_the_background_in_order_with_last_pth_last(tmp_path, monkeypatch):
    written, gate = [], threading.Event()
    real_save = rundir.save_checkpoint

    def slow_save(ckpt, path):
        gate.wait(timeout=30)  # held until the training thread has gone on
        written.append(path.name)
        real_save(ckpt, path)

    monkeypatch.setattr(rundir, "save_checkpoint", slow_save)
    with rundir.RunFolder(tmp_path) as folder:
        epoch(folder, 1, 40.0, is_best=True)
        assert written == []  # handed over: the training thread did not wait for the disk
        gate.set()
    assert written == ["net_001.pth", "best.pth", "last.pth"]
    last = torch.load(tmp_path / "last.pth", weights_only=True)
    assert last["epoch"] == 1 and "optimizer" in last and "optimizer" not in torch.load(tmp_path / "net_001.pth",
                                                                                         weights_only=True)
    assert (tmp_path / "acc.txt").read_text() == "EPOCH=001, Accuracy= 40.000%\n"
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == rundir.METRICS


def test_the_snapshot_is_taken_when_handed_over_not_when_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    with rundir.RunFolder(tmp_path) as folder:
        folder.save_stopped(lambda: {"model": model.state_dict(), "epoch": 0, "accuracy": None}, training(model),
                            3, [1.0, 2.0, 3.0])
        with torch.no_grad():
            model.weight.add_(1.0)  # training goes on meanwhile
    saved = torch.load(tmp_path / "last.pth", weights_only=True)
    torch.testing.assert_close(saved["model"]["weight"] + 1.0, model.weight.detach())
    assert saved["step"] == 3 and saved["totals"] == [1.0, 2.0, 3.0] and "optimizer" in saved


def test_a_failed_write_stops_the_writing_and_is_raised_in_the_training_thread(tmp_path, monkeypatch):
    def full_disk(ckpt, path):
        raise rundir.TrainingError(f"cannot write {path} (No space left on device)")

    folder = rundir.RunFolder(tmp_path)
    monkeypatch.setattr(rundir, "save_checkpoint", full_disk)
    epoch(folder, 1, 40.0, is_best=False)
    deadline = time.monotonic() + 30
    while folder.writer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(rundir.TrainingError, match="net_001.pth"):
        epoch(folder, 2, 40.0, is_best=False)  # the next hand-over raises it
    with pytest.raises(rundir.TrainingError, match="net_001.pth"):
        folder.writer.close()
    assert not (tmp_path / "acc.txt").exists()  # nothing after the failure was written


def test_when_training_fails_the_finished_epochs_are_still_written(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with rundir.RunFolder(tmp_path) as folder:
            epoch(folder, 1, 40.0, is_best=True)
            1 / 0
    assert torch.load(tmp_path / "last.pth", weights_only=True)["epoch"] == 1


def test_an_interrupted_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    (tmp_path / "acc.txt").write_text("old\n")
    with pytest.raises(OSError):
        with rundir.atomic_write(tmp_path / "acc.txt") as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert (tmp_path / "acc.txt").read_text() == "old\n" and list(tmp_path.iterdir()) == [tmp_path / "acc.txt"]


@pytest.mark.skipif(os.name != "posix", reason="a folder can be synced on POSIX only")
def test_a_finished_write_is_flushed_to_disk_then_its_rename_too(tmp_path, monkeypatch):
    synced, fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.fstat(fd).st_ino) or fsync(fd))
    with rundir.atomic_write(tmp_path / "acc.txt") as tmp:
        tmp.write_text("EPOCH=001\n")
        written = tmp.stat().st_ino
    assert synced == [written, tmp_path.stat().st_ino]  # the file's bytes, then the folder that names it


def test_a_run_folder_that_is_a_file_lies_under_one_or_under_a_link_to_nowhere_is_refused_at_once(tmp_path):
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(rundir.TrainingError) as e:
        rundir.RunFolder(tmp_path / "notes")
    assert says(str(e.value), "notes is a file", "--out-dir")
    with pytest.raises(rundir.TrainingError) as e, rundir.RunFolder(tmp_path / "notes" / "run"):
        pass
    assert str(e.value).endswith("notes/run: cannot make this folder: it, or a folder on its path, is a file")
    (tmp_path / "usb").symlink_to(tmp_path / "unmounted" / "runs")  # a disk not mounted
    with pytest.raises(rundir.TrainingError) as e, rundir.RunFolder(tmp_path / "usb" / "r18"):
        pass
    assert says(str(e.value), tmp_path / "usb" / "r18", "cannot make this folder", tmp_path / "unmounted" / "runs")
    assert (tmp_path / "notes").read_text() == "mine"


def test_a_second_train_py_on_a_folder_in_use_stops_before_loading_anything_and_names_the_first(tmp_path):
    args = train.get_args_parser().parse_args(["--out-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "no"),
                                               "--device", "cpu"])
    with rundir.RunFolder(tmp_path / "run"):  # a run at work there: a second terminal, a job sent twice
        with pytest.raises(rundir.TrainingError) as e:
            train.main(args)  # refused before its data (there is none) is looked for
        said = str(e.value)
        assert said.startswith(f"{tmp_path / 'run'} is in use by train.py, process {os.getpid()} on "
                               f"{socket.gethostname()}") and said.endswith("--out-dir") and "\n" not in said
    with rundir.RunFolder(tmp_path / "run"):  # the first has ended: the folder is free again
        pass


@pytest.mark.parametrize("locks", [True, False])  # False: a network file system that refuses them
def test_a_run_folder_a_failed_start_made_is_removed_and_one_written_into_stays(tmp_path, monkeypatch, locks):
    if not locks:
        import fcntl

        def refuse(*_):
            raise OSError(37, "No locks available")  # ENOLCK: the run goes on without a lock
        monkeypatch.setattr(fcntl, "flock", refuse)
    with pytest.raises(RuntimeError):
        with rundir.RunFolder(tmp_path / "runs" / "new"):
            raise RuntimeError("the data did not load")
    assert not (tmp_path / "runs").exists()
    with rundir.RunFolder(tmp_path / "runs" / "new") as folder:
        folder.begin(tmp_path, rundir.Start(), 1)
    assert (tmp_path / "runs" / "new" / "data_dir.txt").is_file()


def test_resume_cuts_the_logs_back_to_the_saved_state_and_rewrites_best_acc(tmp_path):
    (tmp_path / "log.txt").write_text("001 00001 | Loss: 2.000 | Acc: 10.000%\n001 00002 | Loss: 1.900 | Acc: 12.000%\n"
                                      "002 00003 | Loss: 1.800 | Acc: 14.000%\n002 0")
    (tmp_path / "acc.txt").write_text("EPOCH=001, Accuracy= 20.000%\nEPOCH=002, Accuracy= 30.000%\n")
    (tmp_path / "metrics.csv").write_text(f"{rundir.METRICS}\n1,2,3,4,5,6,7,8\n2,2,3,4,5,6,7,8\n")
    folder = rundir.RunFolder(tmp_path)
    folder.begin(tmp_path, rundir.Start(epoch=1, step=0, best=(20.0, 1)), steps_per_epoch=2)
    folder.writer.close()
    assert [line[:9] for line in (tmp_path / "log.txt").read_text().splitlines()] == ["001 00001", "001 00002"]
    assert (tmp_path / "acc.txt").read_text() == "EPOCH=001, Accuracy= 20.000%\n"
    assert (tmp_path / "metrics.csv").read_text() == f"{rundir.METRICS}\n1,2,3,4,5,6,7,8\n"
    assert (tmp_path / "best_acc.txt").read_text() == "EPOCH=1, best_acc=20.000%\n"


def test_resume_keeps_log_lines_past_step_99999_and_epoch_999(tmp_path):
    folder = rundir.RunFolder(tmp_path)
    for epoch_number, step in [(32, 99980), (33, 100000), (1000, 3125000), (1001, 3125020)]:
        folder.log_step(epoch_number, step, 1.0, 50.0)
    folder.begin(tmp_path, rundir.Start(epoch=1000, step=0, best=(20.0, 1)), steps_per_epoch=3125)
    folder.writer.close()
    assert [line[:12] for line in (tmp_path / "log.txt").read_text().splitlines()] == [
        "032 99980 | ", "033 100000 |", "1000 3125000"]


def test_the_newest_good_epoch_is_told_by_number_not_by_name(tmp_path):
    for number in (999, 1000):
        rundir.save_checkpoint({"epoch": number}, tmp_path / f"net_{number:03d}.pth")
    assert [p.name for p in resume.good_epoch_checkpoints(tmp_path)] == ["net_1000.pth", "net_999.pth"]


def finished_epoch(path):
    """A run folder holding epoch 1's files, last.pth included."""
    with rundir.RunFolder(path) as folder:
        epoch(folder, 1, 40.0, is_best=True)
    return path / "last.pth"


def test_a_folder_whose_checkpoints_were_all_deleted_still_holds_its_run_by_its_acc_txt(tmp_path):
    with rundir.RunFolder(tmp_path) as folder:
        for n in (1, 2):
            epoch(folder, n, 40.0 + n, is_best=True)
    for f in tmp_path.glob("*.pth"):
        f.unlink()  # deleted to free room: the logs are still the run's record
    new_run = train.get_args_parser().parse_args([])
    with pytest.raises(resnet.CheckpointError, match="already holds a run: continue it with --resume"):
        resume.plan(tmp_path, new_run, train.RECIPE, train.get_args_parser())
    resumed = train.get_args_parser().parse_args(["--resume"])
    with pytest.raises(resnet.CheckpointError) as e:
        resume.plan(tmp_path, resumed, train.RECIPE, train.get_args_parser())
    assert str(e.value).startswith(f"{tmp_path / 'last.pth'} is missing") and "another --out-dir" in str(e.value)


def test_resume_restores_what_last_pth_saved(tmp_path):
    start = restore(finished_epoch(tmp_path))
    assert (start.epoch, start.step, start.best) == (1, 0, (40.0, 1))


@pytest.mark.parametrize("changes", [{"args": "--epochs 40"}, {"epoch": "1"}, {"epoch": -1}, {"epoch": True},
                                     {"step": 2.5}])
def test_resume_refuses_a_last_pth_whose_args_epoch_or_step_train_py_did_not_write(tmp_path, changes):
    last = finished_epoch(tmp_path)
    torch.save({**torch.load(last, weights_only=True), **changes}, last)
    with pytest.raises(resnet.CheckpointError) as e:
        resume.load(last)
    assert str(e.value).startswith(f"{last}: not a checkpoint of train.py") and "\n" not in str(e.value)


def test_resume_from_the_tutorial_s_weights_says_they_hold_no_run(tmp_path):
    torch.save(resnet.build_model("resnet18").state_dict(), tmp_path / "net_128.pth")  # as the tutorial saves
    with pytest.raises(resnet.CheckpointError) as e:
        resume.load(tmp_path / "net_128.pth")
    assert str(e.value).startswith(f"{tmp_path / 'net_128.pth'}: not a checkpoint of train.py (weights alone")


def resume_with_args(last, saved_args, *flags):
    """resume.plan, as train.py makes and applies it, on last.pth holding saved_args as its recipe."""
    torch.save({**torch.load(last, weights_only=True), "args": saved_args}, last)
    argv = ["--resume", str(last), *flags]
    args = train.get_args_parser().parse_args(argv)
    given = cli.given(train.get_args_parser(), argv, train.RECIPE)
    plan = resume.plan(last.parent, args, train.RECIPE, train.get_args_parser(), given)
    print("\n".join(plan.notes))
    return plan.state, argparse.Namespace(**{**vars(args), **plan.recipe})


def test_resume_takes_the_recipe_train_py_saved(tmp_path):
    saved = {**vars(train.get_args_parser().parse_args(["--epochs", "12", "--flip", "alternate", "--tta"])), "lr": 0.4}
    state, args = resume_with_args(finished_epoch(tmp_path), saved)
    assert state["epoch"] == 1 and (args.epochs, args.flip, args.lr, args.ema) == (12, "alternate", 0.4, 0)
    assert args.tta == "flip"  # the epochs to come are scored as those before, for best.pth


def test_resume_says_where_the_run_goes_on(tmp_path, capsys):
    last = finished_epoch(tmp_path)
    saved = vars(train.get_args_parser().parse_args(["--epochs", "3"]))
    resume_with_args(last, saved)
    assert f"resuming {last} after epoch 1 of 3" in capsys.readouterr().out
    torch.save({**torch.load(last, weights_only=True), "step": 8}, last)  # stopped by Ctrl-C in epoch 2
    resume_with_args(last, saved)
    assert f"resuming {last} in epoch 2 of 3, after its step 8" in capsys.readouterr().out


def test_resume_names_each_recipe_flag_given_that_the_run_does_not_take_even_at_its_default(tmp_path, capsys):
    saved = vars(train.get_args_parser().parse_args(["--epochs", "30"]))
    _, args = resume_with_args(finished_epoch(tmp_path), saved, "--epochs", "40", "--seed", "0", "--lab", "0.2")
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:")]
    assert notes == ["note: ignoring --epochs 40; the run keeps its own (30)",
                     "note: ignoring --label-smoothing 0.2; the run keeps its own (0.1)"]
    assert (args.epochs, args.label_smoothing) == (30, 0.1)
    resume_with_args(finished_epoch(tmp_path), saved)
    assert "note:" not in capsys.readouterr().out  # no flag given, no note
    # called from code, with no command line to tell: a value other than the default was given
    args = train.get_args_parser().parse_args(["--resume", str(tmp_path / "last.pth"), "--epochs", "50", "--seed", "0"])
    notes = resume.plan(tmp_path, args, train.RECIPE, train.get_args_parser()).notes
    assert [ln for ln in notes if ln.startswith("note:")] == ["note: ignoring --epochs 50; the run keeps its own (30)"]


@pytest.mark.parametrize("key, value, why", [
    ("epochs", "forty", "'forty' is not a whole number"), ("epochs", 40.0, "'40.0' is not a whole number"),
    ("epochs", None, "no value"), ("flip", "sideways", "invalid choice: 'sideways'"),
    ("sync_bn", "yes", "'yes' is not on or off"), ("lr", "0.1", "'0.1' is not a number"),
    ("momentum", 1.5, "must be at least 0 and less than 1 (got 1.5)")])
def test_a_saved_recipe_value_train_py_would_refuse_is_one_line_naming_the_flag(tmp_path, key, value, why):
    last = finished_epoch(tmp_path)  # a last.pth edited by hand, or written by other code
    with pytest.raises(resnet.CheckpointError) as e:
        resume_with_args(last, {key: value})
    said = str(e.value)
    assert said.startswith(f"{last}: its recipe's --{key.replace('_', '-')} is not what train.py takes ({why}")
    assert said.endswith("): edited by hand, or saved by other code") and "\n" not in said


@pytest.mark.parametrize("changes", [{"optimizer": {"state": {}}}, {"rng_cpu": torch.zeros(3)},
                                     {"model": {"linear.weight": torch.zeros(10, 512)}}, {"optimizer": []},
                                     {"best_accuracy": "91.2"}, {"best_epoch": 2.5},
                                     {"step": 3, "totals": [1.0, 2]}, {"step": 3, "totals": "1 2 3"}, {"classes": 10}])
def test_a_training_state_that_does_not_load_is_one_line_naming_the_file_and_the_logs_stay(tmp_path, changes):
    last = finished_epoch(tmp_path)
    torch.save({**torch.load(last, weights_only=True), **changes}, last)
    logs = {name: (tmp_path / name).read_text() for name in ("acc.txt", "best_acc.txt", "metrics.csv")}
    with pytest.raises(resnet.CheckpointError) as e:
        restore(last)
    assert str(e.value).startswith(f"{last}: its training state does not load into this run (")
    assert "\n" not in str(e.value)
    assert {name: (tmp_path / name).read_text() for name in logs} == logs


def test_resuming_after_the_class_folders_changed_names_both_class_lists(tmp_path):
    last = finished_epoch(tmp_path)  # trained on CIFAR-10's classes
    with pytest.raises(resnet.CheckpointError) as e:
        restore(last, resnet.build_model("resnet18", 3), classes=["cat", "dog", "ship"])
    said = str(e.value)
    assert said.startswith(f"{last}: ") and "10 classes (airplane, automobile, bird, cat, deer, ...)" in said
    assert "3 classes (cat, dog, ship)" in said and "\n" not in said


def test_resuming_mid_epoch_on_data_that_now_makes_fewer_steps_than_were_done_names_both(tmp_path):
    last = finished_epoch(tmp_path)
    torch.save({**torch.load(last, weights_only=True), "step": 3}, last)  # stopped in epoch 2 after step 3
    with pytest.raises(resnet.CheckpointError) as e:  # pictures deleted from a folder dataset since
        restore(last, steps=3)
    said = str(e.value)
    assert said.startswith(f"{last}: ") and "step 3 of epoch 2" in said and "now has 3 steps" in said
    assert restore(last, steps=4).step == 3


def test_resuming_before_the_best_epoch_puts_best_pth_back_to_the_best_epoch_up_to_there(tmp_path, capsys):
    with rundir.RunFolder(tmp_path) as folder:  # epoch 1 at 40%, epoch 2 the best at 60%, epoch 3 at 50%
        for number, accuracy in ((1, 40.0), (2, 60.0), (3, 50.0)):
            epoch(folder, number, accuracy, is_best=number < 3, best=(60.0, 2) if number == 3 else None)

    def resume_from(name):
        folder = rundir.RunFolder(tmp_path)
        folder.begin(tmp_path, restore(tmp_path / name), 10)
        folder.writer.close()
        return resnet.load_checkpoint(tmp_path / "best.pth")["epoch"], (tmp_path / "best_acc.txt").read_text()

    assert resume_from("last.pth") == (2, "EPOCH=2, best_acc=60.000%\n") and "note" not in capsys.readouterr().out
    # epochs 2 and 3 are trained again: best.pth and best_acc.txt are epoch 1's until a better one comes
    assert resume_from("net_001.pth") == (1, "EPOCH=1, best_acc=40.000%\n")
    assert capsys.readouterr().out.endswith("note: best.pth held epoch 2, which is trained again; it holds epoch 1 "
                                            "again, the best up to epoch 1\n")


def test_the_run_folder_notes_its_data_folder_for_test_py_and_export_py(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    folder = rundir.RunFolder(tmp_path / "runs" / "r")
    folder.begin("data", rundir.Start(), 1)
    folder.writer.close()
    assert rundir.remembered_data_dir(tmp_path / "runs" / "r" / "best.pth") == str(tmp_path / "data")
    assert rundir.remembered_data_dir(tmp_path / "elsewhere" / "best.pth") is None


def test_only_the_main_process_writes_or_builds_a_checkpoint(tmp_path):
    built = []
    with rundir.RunFolder(tmp_path / "run", is_main=False) as folder:
        folder.begin(tmp_path, rundir.Start(), 1)
        folder.log_step(1, 1, 1.0, 50.0)
        epoch(folder, 1, 40.0, is_best=True, built=built)
    assert not (tmp_path / "run").exists() and built == []
    with rundir.RunFolder(tmp_path / "main") as folder:
        folder.begin(tmp_path, rundir.Start(), 1)
        epoch(folder, 1, 40.0, is_best=True, built=built)
    assert built == [1]


def test_a_checkpoint_from_before_the_best_was_recorded_in_it_takes_the_best_from_best_pth(tmp_path):
    old = {"epoch": 3, "accuracy": 50.0, "model": {}, "args": {}}  # net_003.pth as train.py wrote it before
    assert resume.best_until(old, tmp_path) == (50.0, 3)  # no best.pth: its own
    torch.save({"epoch": 2, "accuracy": 55.0, "model": {}}, tmp_path / "best.pth")
    assert resume.best_until(old, tmp_path) == (55.0, 2)
    torch.save({"epoch": 4, "accuracy": 60.0, "model": {}}, tmp_path / "best.pth")  # from after it: not yet reached
    assert resume.best_until(old, tmp_path) == (50.0, 3)
    assert resume.best_until({**old, "best_accuracy": 52.0, "best_epoch": 1}, tmp_path) == (52.0, 1)
