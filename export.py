"""Export a checkpoint to ONNX, check it against PyTorch with onnxruntime, and print
the command that turns it into an Ascend offline model (.om).

    python export.py                                     # runs/resnet18/best.pth -> runs/resnet18/model.onnx
    python export.py --checkpoint runs/photos/best.pth --images 200
    make export RUN_DIR=runs/resnet50
    python export.py --checkpoint model/net_128.pth --data-dir data   # a checkpoint of the tutorials' code

The ONNX model takes a float32 batch (N, 3, size, size), already normalized with
the checkpoint's mean and std (written into the model's metadata with the class
names), and returns the logits (N, classes); N is free. BatchNorm is folded
into the convolutions first, so the graph holds no BatchNormalization nodes:
convolutions, ReLUs, additions, the global average pool and the final Gemm.
Opset 17: the newest that Ascend's ATC reads (CANN supports ONNX 1.12, whose
newest opset is 17).

The check runs the first --images test pictures of the run's dataset through
both and prints the largest difference of the logits; any picture whose top
class differs fails the export. Needs onnx and onnxruntime (requirements-extra.txt).
"""
import inspect
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")  # torch_npu loads in device.py, which explains failures

import torch  # noqa: E402

import batching  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import resnet  # noqa: E402
import rundir  # noqa: E402

OPSET = 17


def get_args_parser():
    p = cli.parser("Export a checkpoint to ONNX and check it with onnxruntime.")
    cli.checkpoint_flags(p, resnet.MODELS)
    p.add_argument("--output", default=None, help="the .onnx file (default: model.onnx beside the checkpoint)")
    p.add_argument("--data-dir", default=None,
                   help="the test pictures' dataset folder (default: the run's, as its run folder noted it)")
    p.add_argument("--images", type=cli.integer(min=1), default=1000,
                   help="test pictures to compare PyTorch and onnxruntime on")
    p.add_argument("--tolerance", type=cli.real(above=0), default=1e-4,
                   help="largest allowed logit difference, relative to the largest logit (float32 sums "
                        "in another order differ a little)")
    return p


class ExportError(cli.UserError):
    """An export that cannot be made or does not match; the message is one line for the user."""


def import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"export needs onnx and onnxruntime ({e.name} is missing): "
                          "pip install -r requirements-extra.txt") from None
    return onnx, onnxruntime


def export(model, path, image_size, metadata):
    """Write model (folded, eval) to path as ONNX with a free batch axis and metadata."""
    onnx, _ = import_onnx()
    example = torch.zeros(1, 3, image_size, image_size)
    # The TorchScript-based exporter writes opset 17 directly; the newer one starts at 18.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices about the exporter itself
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                          do_constant_folding=True, **legacy)
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def compare(model, path, images, mean, std):
    """(largest |logit difference|, largest |logit|, pictures whose top class differs) of
    the checkpoint's network in PyTorch and the exported file in onnxruntime."""
    _, ort = import_onnx()
    x = batching.normalize(images, mean, std)
    with torch.no_grad():
        expected = model(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
    return ((got - expected).abs().max().item(), expected.abs().max().item(),
            int((got.argmax(1) != expected.argmax(1)).sum()))


def main(args):
    model, ckpt = resnet.load_model(rundir.trained(args.checkpoint), args.model)  # the reference: as PyTorch runs it
    if "assumed" in ckpt:
        print(f"note: {ckpt['assumed']}", file=sys.stderr)
    size, mean, std, classes = ckpt["image_size"], ckpt["mean"], ckpt["std"], ckpt["classes"]
    # The pictures to check the export on, loaded first: a missing folder costs no export.
    images, _, _, data_dir, dataset = data.run_test_split(ckpt, args.data_dir, subset=args.images,
                                                          remembered=rundir.remembered_data_dir(args.checkpoint))

    out = Path(args.output) if args.output else Path(args.checkpoint).with_name("model.onnx")
    if out.is_dir():  # found now, not after the export and its check
        raise ExportError(f"{out} is a folder; --output names the .onnx file, e.g. {out / 'model.onnx'}")
    if out.suffix.lower() != ".onnx":  # a checkpoint, say, would be replaced by the export
        raise ExportError(f"{out}: --output names the .onnx file to write, e.g. {out.with_suffix('.onnx')}; "
                          "nothing written")
    metadata = {"arch": ckpt["arch"], "dataset": dataset, "classes": list(classes), "mean": list(mean),
                "std": list(std), "image_size": size}
    # Renamed into place only once it has passed the check: a model.onnx on disk always matched its checkpoint.
    cli.make_folder(out.parent, ExportError)
    try:
        with rundir.atomic_write(out) as tmp:
            export(resnet.for_inference(model), tmp, size, metadata)
            diff, scale, mismatched = compare(model, tmp, images, mean, std)
            if mismatched or diff > args.tolerance * scale:
                raise ExportError(f"the export does not match {args.checkpoint} (largest logit difference "
                                  f"{diff:.2e} of {scale:.3g}, {mismatched} different answers on {len(images)} test "
                                  "pictures); nothing written")
    except OSError as e:  # a folder not ours to write in, a full disk: said of the file asked for, not its .tmp
        raise ExportError(f"cannot write {out} ({e.strerror or e}); nothing written") from None
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {OPSET}, input 'input' N x 3 x {size} x {size} "
          f"normalized with mean {list(mean)} std {list(std)}, output 'logits' N x {len(classes)})")
    print(f"onnxruntime vs PyTorch on {len(images)} test pictures of {data_dir}: largest logit difference "
          f"{diff:.2e} (the largest logit is {scale:.3g}), top-1 the same on all")
    print("\nfor an Ascend NPU, convert it with CANN's ATC (--soc_version: the Name that `npu-smi info` shows):")
    print(f"  atc --model={out} --framework=5 --output={out.with_suffix('')} "
          f"--input_shape=\"input:1,3,{size},{size}\" --soc_version=<soc_version>")
    print("  (several batch sizes: --input_shape=\"input:-1,3,...\" --dynamic_batch_size=\"1,8,32\")")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.main(lambda: main(args))
