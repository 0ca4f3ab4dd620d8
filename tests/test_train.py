"""train.py: what a run writes, how it resumes, and that it learns."""
import re

import pytest
import torch

import optim
import report
import resnet
import resume
import train
from conftest import QUICK, one_line_error, run_here, write_cifar


@pytest.mark.slow
def test_each_epoch_writes_the_tutorial_logs_in_their_formats(trained_run):
    run_dir, _ = trained_run
    log = (run_dir / "log.txt").read_text().splitlines()
    # 16 images in steps of 8 with a line every step: iterations 1..4 over two epochs
    assert [ln[:9] for ln in log] == ["001 00001", "001 00002", "002 00003", "002 00004"]
    assert all(re.fullmatch(r"\d{3} \d{5} \| Loss: \d+\.\d{3} \| Acc: \d+\.\d{3}%", ln) for ln in log)
    acc = (run_dir / "acc.txt").read_text().splitlines()
    assert len(acc) == 2 and all(re.fullmatch(r"EPOCH=00[12], Accuracy= +\d+\.\d{3}%", ln) for ln in acc)
    best = (run_dir / "best_acc.txt").read_text().strip()
    assert re.fullmatch(r"EPOCH=[12], best_acc=\d+\.\d{3}%", best)
    best_epoch, best_value = re.match(r"EPOCH=(\d+), best_acc=(\S+)%", best).groups()
    assert max(float(ln.split("= ")[1].rstrip("%")) for ln in acc) == float(best_value)


@pytest.mark.slow
def test_each_epoch_writes_a_checkpoint_plus_best_and_last(trained_run):
    run_dir, _ = trained_run
    assert {p.name for p in run_dir.glob("*.pth")} == {"net_001.pth", "net_002.pth", "best.pth", "last.pth"}
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.slow
def test_a_checkpoint_describes_itself_and_loads_with_weights_only(trained_run):
    run_dir, _ = trained_run
    ckpt = torch.load(run_dir / "net_002.pth", map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "resnet18" and ckpt["num_classes"] == 10 and ckpt["epoch"] == 2
    assert ckpt["classes"][0] == "airplane" and ckpt["image_size"] == 32
    assert ckpt["mean"] == [0.4914, 0.4822, 0.4465] and ckpt["std"] == [0.2470, 0.2435, 0.2616]
    assert 0 <= ckpt["accuracy"] <= 100 and ckpt["args"]["batch_size"] == 8
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert "optimizer" not in ckpt
    last = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    assert {"optimizer", "scheduler", "best_accuracy", "best_epoch", "rng_cpu", "args"} <= set(last)
    model, _ = resnet.load_model(run_dir / "net_002.pth")
    assert model.linear.out_features == 10


@pytest.mark.parametrize("n, batch, suggested", [(300, 512, 32), (2000, 512, 128), (16, 8, 2)])
def test_a_training_set_of_a_few_batches_gets_a_note_suggesting_a_batch_of_8_steps_or_more(n, batch, suggested):
    steps = max(1, n // batch)  # a set smaller than a batch is one step of all of it
    note = report.few_steps_note(n, steps, 40)
    assert f"{steps} step" in note and f"{40 * steps} in all" in note
    assert f"--batch-size {suggested} makes {n // suggested} per epoch, {40 * (n // suggested)} in all" in note
    assert n // suggested >= 8 and n // (2 * suggested) < 8  # the largest power of two that gives 8 steps


def test_a_run_of_fewer_than_100_steps_gets_a_note_suggesting_a_batch_that_makes_100():
    # a quick look: 5,000 pictures for 2 epochs at batch 512 are 9 steps an epoch, 18 in all
    note = report.few_steps_note(5000, 9, 2)
    assert note.startswith("note: 9 steps per epoch, 18 in all") and "--batch-size 64 makes 78 per epoch" in note
    assert "--batch-size 64 " in report.few_steps_note(10_752, 84, 1)  # 168 steps where 128 makes 84


def test_no_note_once_an_epoch_has_8_steps_and_the_run_100():
    assert report.few_steps_note(50_000, 97, 40) is None and report.few_steps_note(64, 8, 40) is None
    assert report.few_steps_note(50_000, 97, 2) is None and report.few_steps_note(1000, 100, 1) is None
    # nor where the batch that would make 100 steps is under 16 pictures and 16 makes none more
    assert report.few_steps_note(128, 8, 1) is None


def test_the_command_to_continue_a_run_repeats_the_flags_given_that_resume_does_not_keep(monkeypatch):
    argv = ["--epochs", "30", "--data-dir", "my data", "--device", "cuda", "--amp", "off", "--compile", "--fused",
            "--log-every", "5", "--eval-batch-size", "256", "--stop-after", "2", "--out-dir", "runs/a"]
    args = train.get_args_parser().parse_args(argv)  # --epochs, --amp: the run keeps them; --stop-after: done with
    assert resume.command("runs/a/last.pth", args, train.get_args_parser()) == (
        "python train.py --resume runs/a/last.pth --data-dir 'my data' --device cuda --compile default "
        "--fused --eval-batch-size 256 --log-every 5")
    bare, parser = train.get_args_parser().parse_args([]), train.get_args_parser()
    assert resume.command("runs/resnet18/last.pth", bare, parser) == "python train.py --resume runs/resnet18/last.pth"
    monkeypatch.setenv("WORLD_SIZE", "4")  # under torchrun, as the job was started
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    torchrun = "torchrun --standalone --nproc_per_node=4 train.py --resume r/last.pth"
    assert resume.command("r/last.pth", bare, parser) == torchrun
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two machines: their rendezvous flags are the job's own
    assert resume.command("r/last.pth", bare, parser) == "torchrun ... train.py --resume r/last.pth"


def test_the_time_left_goes_at_the_pace_of_the_epochs_done_less_the_first_step():
    # 3 epochs of 10 s done, the first with a 50 s compilation in its first step: 7 more take 70 s, not 187
    assert report.seconds_left(80, 50, 3, 7) == pytest.approx(70)
    assert report.seconds_left(30, 0.1, 3, 0) == 0


def test_the_time_left_reads_in_seconds_minutes_or_hours():
    assert [report.duration(s) for s in (0.4, 89, 91, 5399, 5401, 30 * 3600)] == \
        ["0s", "89s", "2 min", "90 min", "1.5 h", "30.0 h"]


def test_a_loss_reads_with_three_decimals_and_a_loss_thrown_off_course_by_its_size():
    assert [report.loss_text(x) for x in (2.3026, 999.4, 24249671.68, float("nan"))] == \
        ["2.303", "999.400", "2.42e+07", "nan"]


@pytest.mark.slow
def test_progress_without_a_terminal_is_plain_lines_and_the_last_line_sums_up(trained_run):
    _, proc = trained_run
    assert "\r" not in proc.stdout
    assert re.search(r"epoch 1/2 step 2/2 loss \S+ acc \S+% lr \S+ img_s \d+", proc.stdout)
    assert "note: 2 steps per epoch, 4 in all: too few" in proc.stdout  # 16 pictures in batches of 8
    assert re.search(r"epoch +2/2 \| train loss .* \| test loss .* acc .*% \|", proc.stdout)
    epochs = [ln for ln in proc.stdout.splitlines() if re.match(r"epoch +\d/2 \|", ln)]
    assert re.search(r" \| \d+s left$", epochs[0]) and not epochs[1].endswith("left")  # the time the rest takes
    assert re.fullmatch(r"best accuracy \d+\.\d\d% at epoch [12], total time \d+\.\ds .*",
                        proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_run_that_never_scores_above_0_percent_still_has_a_best_pth(tmp_path, cifar_dir, monkeypatch):
    monkeypatch.setattr(train, "evaluate", lambda *args: (2.3, 0.0))  # every epoch: 0% of the test pictures
    args = ["--data-dir", str(cifar_dir), "--out-dir", str(tmp_path / "run"), "--epochs", "2", *QUICK]
    assert train.main(train.get_args_parser().parse_args(args)).code == 0
    assert (tmp_path / "run" / "best_acc.txt").read_text() == "EPOCH=1, best_acc=0.000%\n"
    assert torch.load(tmp_path / "run" / "best.pth", weights_only=True)["epoch"] == 1


def test_the_schedule_warms_up_then_decays_to_zero_over_exactly_the_requested_steps():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.4)
    sched = optim.make_schedule(opt, total_steps=100, warmup=0.15)
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.4 / 15) and max(lrs) == pytest.approx(0.4)
    assert lrs.index(max(lrs)) == 14 and lrs[-1] > 0
    assert sched.get_last_lr()[0] == 0.0  # after the last step of the last epoch


@pytest.mark.slow
def test_a_stopped_and_resumed_run_ends_identical_to_an_uninterrupted_one(tmp_path, cifar_dir):
    # with the fast recipe's levers: EMA, alternating flip, no decay on BatchNorm, zero-initialised blocks
    recipe = ["--ema", "0.9", "--flip", "alternate", "--norm-weight-decay", "0", "--zero-init-residual"]
    common = ["--data-dir", cifar_dir, "--epochs", "3", "--log-every", "1", *QUICK, *recipe]
    run_here("train.py", *common, "--out-dir", "whole", cwd=tmp_path)
    stopped = run_here("train.py", *common, "--out-dir", "parts", "--stop-after", "1", cwd=tmp_path)
    assert "--resume" in stopped.stdout
    again = run_here("train.py", "--resume", "--out-dir", "parts", "--data-dir", cifar_dir, "--device", "cpu",
                     "--stop-after", "1", cwd=tmp_path)
    last = again.stdout.splitlines()[-1]  # the command to paste: its data are not in data/
    assert last.startswith("nothing to do") and last.endswith(f"python train.py --resume parts/last.pth --data-dir "
                                                              f"{cifar_dir} --device cpu")
    # As if killed during epoch 2: lines of an unfinished epoch are in the logs.
    with open(tmp_path / "parts" / "log.txt", "a") as f:
        f.write("002 00003 | Loss: 9.999 | Acc: 0.000%\n")
    with open(tmp_path / "parts" / "acc.txt", "a") as f:
        f.write("EPOCH=002, Accuracy= 0.000%\n")
    run_here("train.py", "--resume", tmp_path / "parts" / "last.pth", "--data-dir", cifar_dir, "--device", "cpu",
             "--log-every", "1", "--eval-batch-size", "100", cwd=tmp_path)  # the flags --resume does not keep

    whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "last.pth", weights_only=True)
    for weights in ("model", "training_model"):  # the average and the weights training goes on from
        for key, value in whole[weights].items():
            assert torch.equal(value, parts[weights][key]), key
    assert whole["accuracy"] == parts["accuracy"]
    # every line once, the interrupted epoch's leftovers gone
    for name in ("log.txt", "acc.txt", "best_acc.txt"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "parts" / name).read_text()
    # metrics.csv: appended on resume, header once; the same numbers but for the timings
    numbers = lambda run: [ln.split(",")[:6] for ln in (tmp_path / run / "metrics.csv").read_text().splitlines()]
    assert numbers("parts") == numbers("whole") and len(numbers("parts")) == 4


@pytest.mark.slow
def test_training_learns_a_separable_set_far_beyond_chance(tmp_path):
    root = write_cifar(tmp_path / "easy", n_train=96, n_test=50, seed=3)
    proc = run_here("train.py", "--data-dir", root, "--epochs", "3", "--batch-size", "16", "--lr", "0.01",
                    "--device", "cpu", cwd=tmp_path)
    final = float((tmp_path / "runs" / "resnet18" / "acc.txt").read_text().splitlines()[-1].split("= ")[1][:-1])
    # 18 steps and 50 test images: where it ends swings with the seed and the CPU's bf16 kernels, far above 10%
    assert final >= 50.0, proc.stdout


@pytest.mark.slow
def test_a_new_run_never_overwrites_a_finished_one(trained_run, cifar_dir):
    run_dir, _ = trained_run
    before = (run_dir / "acc.txt").read_text()
    proc = run_here("train.py", "--data-dir", cifar_dir, *QUICK, cwd=run_dir.parent.parent, check=False)
    assert "--resume" in one_line_error(proc)
    assert (run_dir / "acc.txt").read_text() == before


@pytest.mark.slow
def test_nor_one_whose_last_pth_is_gone_nor_a_resumed_run_sent_into_another_run_s_folder(trained_run, cifar_dir,
                                                                                         tmp_path):
    import shutil
    run_dir, _ = trained_run
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (other / "last.pth").unlink()  # deleted to free room: best.pth and net_XXX.pth are still the run's
    proc = run_here("train.py", "--data-dir", cifar_dir, *QUICK, "--out-dir", other, cwd=tmp_path, check=False)
    line = one_line_error(proc)
    assert "already holds a run" in line and "--resume" in line and "--out-dir" in line and "RUN_DIR" not in line
    proc = run_here("train.py", "--resume", "--data-dir", cifar_dir, "--device", "cpu", "--out-dir", other,
                    cwd=tmp_path, check=False)  # a bare --resume does not start the run afresh over it
    line = one_line_error(proc)
    assert "is missing" in line and line.endswith(f"--resume {other / 'net_002.pth'}")
    proc = run_here("train.py", "--resume", run_dir / "last.pth", "--data-dir", cifar_dir, "--device", "cpu",
                    "--out-dir", other, cwd=tmp_path, check=False)
    line = one_line_error(proc)
    assert f"{other} already holds another run" in line and "leave out --out-dir" in line
    assert (other / "acc.txt").read_text() == (run_dir / "acc.txt").read_text()


@pytest.mark.slow
def test_resuming_from_an_earlier_epoch_says_which_epochs_are_trained_again(trained_run, cifar_dir, tmp_path):
    import shutil
    run_dir, _ = trained_run
    shutil.copytree(run_dir, tmp_path / "run")
    proc = run_here("train.py", "--resume", tmp_path / "run" / "net_001.pth", "--data-dir", cifar_dir,
                    "--device", "cpu", cwd=tmp_path)
    assert f"note: {tmp_path / 'run'} holds epochs up to 2; epochs 2 to 2 are trained again" in proc.stdout


@pytest.mark.slow
def test_a_resumed_run_keeps_the_precision_it_started_in_and_says_so(tmp_path, cifar_dir):
    common = ["--data-dir", cifar_dir, "--epochs", "2", *QUICK]
    first = run_here("train.py", *common, "--amp", "bf16", "--stop-after", "1", cwd=tmp_path)
    assert ", bf16" in first.stdout.splitlines()[0]
    again = run_here("train.py", *common, "--resume", "--amp", "off", cwd=tmp_path)  # off: QUICK's, given again
    assert "note: ignoring --amp off; the run keeps its own (bf16)" in again.stdout
    assert [ln for ln in again.stdout.splitlines() if ln.startswith("resnet18 on cpu")][0].startswith(
        "resnet18 on cpu, bf16")
    assert torch.load(tmp_path / "runs" / "resnet18" / "last.pth", weights_only=True)["args"]["amp"] == "bf16"


@pytest.mark.slow
def test_resuming_a_finished_run_has_nothing_to_do(trained_run, cifar_dir):
    run_dir, _ = trained_run
    for stop_after in ([], ["--stop-after", "1"]):  # finished is finished, whatever stop is asked for
        proc = run_here("train.py", "--resume", "--data-dir", cifar_dir, "--device", "cpu", *stop_after,
                        cwd=run_dir.parent.parent)
        last = proc.stdout.splitlines()[-1]
        assert proc.returncode == 0 and last.startswith("nothing to do: the run already finished, at epoch 2 of 2")
        assert not (run_dir / "net_003.pth").exists()


@pytest.mark.slow
def test_missing_data_is_a_one_line_error_that_says_how_to_fetch_it(tmp_path):
    proc = run_here("train.py", "--data-dir", tmp_path / "nothing", "--device", "cpu", cwd=tmp_path, check=False)
    assert "python data.py" in one_line_error(proc) and "make" not in one_line_error(proc)
