"""The levers of the fast recipe, each checked against its arithmetic: the EMA of the weights,
the alternating flip, no weight decay on BatchNorm and biases, the zero-initialised last
BatchNorm of each block, flip-and-shift test-time augmentation, and the fused optimizer."""
import pytest
import torch
import torch.nn.functional as F

import batching
import optim
import resnet
import train


def recipe(*flags):
    return train.get_args_parser().parse_args(list(flags))


def test_the_ema_follows_its_formula_and_starts_with_a_short_memory():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = optim.EMA(model, decay=0.9)
    averaged = 0.0
    for step in range(1, 100):
        with torch.no_grad():
            model.weight.fill_(float(step))  # the weights move by one every step
        ema.update()
        decay = min(0.9, (1 + step) / (10 + step))  # (1+n)/(10+n): 0.18 after the first step
        averaged = decay * averaged + (1 - decay) * step
        assert ema.model.weight[0, 0].item() == pytest.approx(averaged, rel=1e-6)
    assert ema.decay_now() == 0.9 and ema.updates == 99
    assert not ema.model.weight.requires_grad and not ema.model.training


def test_the_ema_averages_batchnorm_statistics_and_copies_its_batch_count():
    model = torch.nn.BatchNorm2d(3)
    ema = optim.EMA(model, decay=0.5)  # a copy: running mean 0, variance 1
    model.train()(torch.randn(8, 3, 4, 4) + 5)  # the running statistics move
    ema.update()
    d = min(0.5, 2 / 11)
    torch.testing.assert_close(ema.model.running_mean, (1 - d) * model.running_mean)
    torch.testing.assert_close(ema.model.running_var, d + (1 - d) * model.running_var)
    assert ema.model.num_batches_tracked.item() == model.num_batches_tracked.item() == 1


def epoch_mirrors(loader, epoch):
    """{picture number: mirrored?} for one training epoch of pictures made by mirror_pictures."""
    loader.set_epoch(epoch)
    x, _ = next(iter(loader))
    left, right = x[:, 0, 0, 0].round().long(), x[:, 0, 0, 1].round().long()
    return dict(zip((left + right).tolist(), (left == 0).tolist()))


def mirror_pictures(flip):
    """64 pictures 2 pixels wide: number i+1 on the left, 0 on the right, so a mirrored one
    shows its number on the right; normalized to the pixel values themselves."""
    images = torch.zeros(64, 3, 1, 2, dtype=torch.uint8)
    images[:, :, 0, 0] = torch.arange(1, 65, dtype=torch.uint8).view(64, 1)
    return batching.CifarLoader(images, torch.zeros(64, dtype=torch.long), 64, (0.0,) * 3, (1 / 255,) * 3, train=True,
                            device=torch.device("cpu"), pad=0, flip=flip, seed=7)


def test_the_alternating_flip_shows_each_picture_both_ways_in_any_two_epochs_in_a_row():
    loader = mirror_pictures("alternate")
    first, second, third = (epoch_mirrors(loader, e) for e in (1, 2, 3))
    assert sorted(first) == list(range(1, 65))
    assert all(first[i] != second[i] for i in first) and first == third
    assert 16 < sum(first.values()) < 48  # the first epoch's coin is fair


def test_the_random_flip_tosses_a_coin_per_picture_every_epoch():
    loader = mirror_pictures("random")
    first, second = epoch_mirrors(loader, 1), epoch_mirrors(loader, 2)
    same = sum(first[i] == second[i] for i in first)
    assert 16 < same < 48  # about half the pictures get the same view twice
    with pytest.raises(ValueError, match="flip"):
        mirror_pictures("sideways")


def test_norm_weight_decay_applies_to_batchnorm_and_biases_and_weight_decay_to_the_rest():
    model = resnet.build_model("resnet18")
    groups = optim.make_optimizer(model, recipe("--weight-decay", "5e-4", "--norm-weight-decay", "0")).param_groups
    decayed, spared = groups
    assert decayed["weight_decay"] == 5e-4 and spared["weight_decay"] == 0
    assert {id(p) for p in spared["params"]} == {id(p) for n, p in model.named_parameters()
                                                  if ".bn" in n or n.startswith("bn") or "shortcut.1" in n
                                                  or n == "linear.bias"}
    assert len(optim.make_optimizer(model, recipe()).param_groups) == 1  # by default: one group, as before


def test_zero_init_residual_starts_each_block_as_its_shortcut():
    for arch, last in (("resnet18", "bn2"), ("resnet50", "bn3")):
        model = resnet.build_model(arch, zero_init_residual=True)
        blocks = [m for m in model.modules() if isinstance(m, (resnet.BasicBlock, resnet.Bottleneck))]
        assert blocks and all(getattr(b, last).weight.abs().sum() == 0 for b in blocks)
        block = blocks[1].eval()  # an identity-shortcut block: it passes its (non-negative) input through
        x = torch.rand(2, block.conv1.in_channels, 8, 8)
        torch.testing.assert_close(block(x), x)
    assert resnet.build_model("resnet18").layer1[0].bn2.weight.abs().sum() > 0


def test_flip_shift_tta_weighs_the_two_plain_views_half_and_the_four_shifted_ones_half():
    torch.manual_seed(0)
    model = resnet.build_model("resnet18").eval()
    x = torch.randn(3, 3, 32, 32)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    views = [x, x.flip(3)], [padded[:, :, :32, :32], padded[:, :, :32, :32].flip(3),
                             padded[:, :, 2:, 2:], padded[:, :, 2:, 2:].flip(3)]
    with torch.no_grad():
        expected = (sum(model(v) for v in views[0]) / 2 + sum(model(v) for v in views[1]) / 4) / 2
        torch.testing.assert_close(resnet.tta_logits(model, x, "flip-shift"), expected)
        torch.testing.assert_close(resnet.tta_logits(model, x, "flip"), (model(x) + model(x.flip(3))) / 2)
        torch.testing.assert_close(resnet.tta_logits(model, x, "off"), model(x))


def test_the_fused_optimizer_takes_the_same_steps():
    results = []
    for flags in ((), ("--fused",)):
        torch.manual_seed(0)
        model = resnet.build_model("resnet18")
        optimizer = optim.make_optimizer(model, recipe("--norm-weight-decay", "0", *flags))
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))),
                            torch.arange(4)).backward()
            optimizer.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert optimizer.defaults["fused"]
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
