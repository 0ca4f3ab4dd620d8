"""Pictures as the network sees them: one file of any kind Pillow reads (train, test, predict,
the window), or a folder dataset of them, DIR/{train,test}/<class>/<picture>.

    image = pictures.load_picture("photos/cat.jpg", 32)             # uint8, 3 x 32 x 32
    images, labels, classes = pictures.load_folder("photos", train=True, image_size=64)

A folder is decoded once (Pillow, upright, RGB, center square, resized) and cached as arrays
in DIR/.cache/. DataError, the error of any data that cannot be used, lives here, at the
bottom of the data modules (data.py and batching.py raise it too).
"""
import contextlib
import hashlib
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import torch

import cli


class DataError(cli.UserError):
    """Data that cannot be used; the message is one line for the user."""


class PictureError(cli.UserError):
    """A picture that cannot be used; the message is one line for the user."""


def to_rgb(im):
    """Any Pillow mode as 8-bit RGB; transparency is laid on white."""
    import numpy as np
    from PIL import Image
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16/32-bit grayscale
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)  # no number: black
        # 16-bit if any value says so; a float picture (a TIFF from science or a renderer) is often 0..1
        top = 65535.0 if arr.max() > 255 else 1.0 if im.mode == "F" and arr.max() <= 1 else 255.0
        im = Image.fromarray((arr * 255.0 / top).clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("RGB")


def open_picture(path, draft=None):
    """A picture file (a path, or a binary stream such as sys.stdin.buffer) as an upright 8-bit RGB
    Pillow image, or PictureError.

    draft: (w, h) a JPEG may be decoded at instead of full size (big photos load
    many times faster; the result is at least that large). Pillow's pixel limit is
    applied to what is decoded: a phone's 200-megapixel JPEG passes at a fraction of
    its size, a PNG that large does not."""
    from PIL import Image, ImageOps
    name = getattr(path, "name", "<stream>") if hasattr(path, "read") else path  # sys.stdin.buffer: '<stdin>'
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's later checks (GIF frames)
            Image.MAX_IMAGE_PIXELS = None  # Image.open's check comes before draft() could shrink the picture
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
            with im:
                if draft:
                    im.draft("RGB", draft)
                if limit and im.size[0] * im.size[1] > limit:  # Pillow warns up to 2x the limit: refused here
                    raise Image.DecompressionBombError(f"{im.size[0]} x {im.size[1]} pixels")
                return to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise PictureError(f"{name}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PictureError(f"{name}: too many pixels to decode safely (a decompression bomb?)") from None
    except Image.UnidentifiedImageError:  # its message names the file again, a stream by its repr
        raise PictureError(f"{name}: cannot read picture (cannot identify image file)") from None
    except Exception as e:  # truncated, unsupported; or the system's refusal (a name too long, ...)
        detail = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
        raise PictureError(f"{name}: cannot read picture ({detail})") from None


def load_picture(path, size):
    """A picture file as the model sees it: uint8 tensor (3, size, size), center square, or PictureError."""
    import numpy as np
    from PIL import Image
    im = open_picture(path, draft=(size * 2, size * 2))
    w, h = im.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    im = im.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def visible_files(folder):
    """Files under folder, sorted, skipping hidden ones (.DS_Store, .cache/ and the like). Its
    sub-folders may be links (class folders linked in from elsewhere, as datasets are often put
    together); links further down are not followed, so a link loop cannot trap the walk. A
    folder that cannot be read raises OSError: skipped, its pictures would be missed unnoticed."""
    def unreadable(error):
        raise error

    found = []
    for entry in Path(folder).iterdir():
        if entry.name.startswith("."):
            continue
        if os.path.isdir(entry):
            for root, folders, files in os.walk(entry, onerror=unreadable):
                folders[:] = [name for name in folders if not name.startswith(".")]
                found += [Path(root, name) for name in files
                          if not name.startswith(".") and os.path.isfile(os.path.join(root, name))]
        elif os.path.isfile(entry):
            found.append(entry)
    return sorted(found)


def folder_classes(data_dir):
    """The class names of a folder dataset: the sub-folders of DIR/train, sorted."""
    train_dir = Path(data_dir) / "train"
    if not train_dir.is_dir() or not (Path(data_dir) / "test").is_dir():
        raise DataError(f"{data_dir}: a folder dataset needs {data_dir}/train/<class>/ and "
                        f"{data_dir}/test/<class>/ holding pictures")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{train_dir}: no class folders (expected {train_dir}/<class>/<picture>)")
    if len(classes) == 1:
        raise DataError(f"{train_dir}: one class folder ({classes[0]}); telling pictures apart takes two or more")
    return classes


def cache_copy(cache, writer="*"):
    """The temporary copy of cache that writer (host-pid) fills before renaming it into place; "*": any."""
    return cache.with_name(f"{cache.name}.{writer}.tmp.npz")


def remove_abandoned(cache, minutes=10):
    """Delete the temporary copies of cache that a killed process left (kill -9 while writing it):
    untouched for some minutes, where a writer still at work touches its copy all the while."""
    for tmp in cache.parent.glob(cache_copy(cache).name):
        with contextlib.suppress(OSError):  # gone already: another process removed it
            if time.time() - tmp.stat().st_mtime > minutes * 60:
                tmp.unlink()


def load_folder(data_dir, train, image_size=32):
    """One split of DIR/{train,test}/<class>/* as (uint8 N x 3 x size x size, labels, classes).

    Every picture is decoded once (Pillow, upright, RGB, center square, resized)
    and the arrays are cached in DIR/.cache/; the cache is used while the split's
    files (names, sizes, times) and the size stay the same, and rebuilt
    otherwise. Files that are not readable pictures are listed and skipped.
    The order is shuffled once, with a fixed seed, so --subset takes a sample of
    every class rather than the first classes.
    """
    import numpy as np
    classes = folder_classes(data_dir)
    split = "train" if train else "test"
    split_dir = Path(data_dir) / split
    try:
        files = visible_files(split_dir)
    except OSError as e:  # a folder of another user's, say: its pictures would be missing from the split
        raise DataError(f"{split_dir}: cannot read {e.filename or split_dir} ({e.strerror or e})") from None
    refuse_unknown_classes(files, split_dir, classes)
    fingerprint = folder_fingerprint(files, split_dir, image_size, classes)
    cache = Path(data_dir) / ".cache" / f"{split}-{image_size}px.npz"
    remove_abandoned(cache)
    cached = read_cache(cache, fingerprint)
    if cached is not None:
        return *cached, classes
    images, labels = decode_pictures(files, split_dir, classes, image_size)
    empty = sorted(set(classes) - {classes[i] for i in set(labels)})
    named = cli.first_few(empty)
    if train and empty:  # a class the network could never learn
        raise DataError(f"{split_dir}: no readable pictures in the class folders {named}; add some, or remove "
                        "those folders")
    if empty:
        print(f"note: {split_dir} has no pictures of {named}: the test accuracy leaves "
              f"{'that class' if len(empty) == 1 else 'those classes'} out", file=sys.stderr)
    order = np.random.RandomState(0).permutation(len(images))
    images, labels = np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order]
    write_cache(cache, fingerprint, images, labels)
    return torch.from_numpy(images), torch.from_numpy(labels), classes


def refuse_unknown_classes(files, split_dir, classes):
    """A DataError naming the class folders of split_dir that train/ does not have: pictures the
    network could never name, which a test accuracy would leave out without a word."""
    unknown = {}
    for f in files:
        parts = f.relative_to(split_dir).parts
        if len(parts) >= 2 and parts[0] not in classes:
            unknown[parts[0]] = unknown.get(parts[0], 0) + 1
    if unknown:
        names, train_dir = sorted(unknown), split_dir.parent / "train"
        raise DataError(f"{split_dir}: {'class' if len(names) == 1 else 'classes'} {cli.first_few(names)} "
                        f"({cli.plural(sum(unknown.values()), 'file')}) not in {train_dir}: add "
                        f"{'its' if len(names) == 1 else 'their'} training pictures there, or take "
                        f"{'it' if len(names) == 1 else 'them'} out of {split_dir}")


def folder_fingerprint(files, split_dir, image_size, classes):
    """What the cache of a split is valid for: its files' names, sizes and times, the size and the classes."""
    h = hashlib.sha256(f"v1 {image_size} {classes}".encode())
    for f in files:
        st = f.stat()
        # the name's bytes as the file system holds them, UTF-8 or not (a GBK name from a Windows zip, say)
        h.update(os.fsencode(f.relative_to(split_dir)) + f" {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_cache(cache, fingerprint):
    """(images, labels) from the cache file if it was made for fingerprint, else None."""
    import numpy as np
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["fingerprint"]) == fingerprint:
                return torch.from_numpy(z["images"]), torch.from_numpy(z["labels"])
    except Exception:  # a damaged cache is rebuilt like a stale one
        pass
    return None


def write_cache(cache, fingerprint, images, labels):
    """Save the decoded split; where that fails, everything still works, only slower next time."""
    import numpy as np
    # A name of its own for each torchrun process, on any of the machines that share the folder.
    tmp = cache_copy(cache, f"{socket.gethostname()}-{os.getpid()}")
    try:
        cache.parent.mkdir(exist_ok=True)
        np.savez(tmp, images=images, labels=labels, fingerprint=np.array(fingerprint))
        os.replace(tmp, cache)
    except BaseException as e:  # a read-only folder or a full disk
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # no half-written copy left behind, nor after Ctrl-C
        if not isinstance(e, OSError):
            raise
        print(f"note: cannot cache the decoded pictures in {cache.parent} ({e.strerror or e})", file=sys.stderr)


def decode_pictures(files, split_dir, classes, image_size):
    """The pictures of a split's class folders, decoded, as (list of uint8 arrays, list of labels).
    Files that are no readable pictures or outside a class folder are skipped, and listed on stderr."""
    images, labels, skipped = [], [], []
    for f in files:
        parts = f.relative_to(split_dir).parts
        if len(parts) < 2:
            skipped.append(f"{f} (not inside a class folder)")
            continue
        try:
            images.append(load_picture(f, image_size).numpy())
            labels.append(classes.index(parts[0]))
        except PictureError as e:
            skipped.append(str(e))
    if skipped:  # file by file (the first 20), so the user can fix or remove them
        print(f"skipped {len(skipped)} of {len(files)} files in {split_dir}:", file=sys.stderr)
        for line in skipped[:20]:
            print(f"  {line}", file=sys.stderr)
        if len(skipped) > 20:
            print(f"  and {len(skipped) - 20} more", file=sys.stderr)
    if not images:
        raise DataError(f"{split_dir}: no readable pictures in its class folders")
    return images, labels
