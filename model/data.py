"""Image-classification data: PathMNIST as released, any .npz in its layout, or a class-per-folder set.

Every loader returns an `ImageSet`: uint8 images (N, 3, S, S), int64 labels (N,), class names, where
the data came from and a fingerprint of it (md5 of the file, or a content hash of the folder), so a
checkpoint records exactly what it was trained on.

`--data` accepts:
  pathmnist | pathmnist_64 | pathmnist_128 | pathmnist_224   the official file, downloaded once into
      the cache folder (~/.cache/medsynth, or $MEDSYNTH_CACHE) and checked against its MD5. All four
      come from the MedMNIST+ release (medmnist 3.x, Zenodo record 10519652): its 28 px file is
      MedMNIST v2's, the 64, 128 and 224 px files are new in MedMNIST+;
  path/to/file.npz   keys `{split}_images` (N, S, S, 3) or (N, S, S) uint8 and `{split}_labels` (N, 1)
      or (N,); an optional `classes` array names the classes, otherwise they are PathMNIST's nine;
  path/to/folder     one sub-folder per class (ImageFolder style). If the folder has `train/`, `val/`
      or `test/` sub-folders, each holds its split. Otherwise every class is split 70/15/15 by a hash
      of the file names: the split never depends on --seed, so no run trains on another's test images.
      Classes are in name order, except that PathMNIST's nine names keep PathMNIST's label order.
      Folder images are centre-cropped to a square and resized to `size` (default: the side of the
      first image, at most 224 px).
PathMNIST's class names may be spelt as MedMNIST spells its labels ("smooth muscle",
"cancer-associated stroma"; any case, spaces, hyphens or underscores), in folder names and in an
npz's `classes`: they are read as our names, so they get PathMNIST's indices and our prompts.
"""
import hashlib
import os
import urllib.request
import zipfile
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from model.io import UserError

# The one place that names PathMNIST's classes (label order of MedMNIST's INFO["pathmnist"]) and
# says how to describe each one in a prompt.
PATHMNIST_CLASSES = [
    "adipose", "background", "debris", "lymphocytes", "mucus", "smooth_muscle",
    "normal_colon_mucosa", "cancer_associated_stroma", "colorectal_adenocarcinoma_epithelium",
]
PATHMNIST_DESCRIPTIONS = {
    "adipose": "adipose tissue",
    "background": "slide background",
    "debris": "debris and necrosis",
    "lymphocytes": "lymphocytes",
    "mucus": "mucus",
    "smooth_muscle": "smooth muscle",
    "normal_colon_mucosa": "normal mucosa",
    "cancer_associated_stroma": "cancer-associated stroma",
    "colorectal_adenocarcinoma_epithelium": "adenocarcinoma epithelium",
}
DEFAULT_PROMPT_TEMPLATE = "an H&E stained histopathology image of colorectal {desc}"

# The MedMNIST+ release (medmnist 3.x, Zenodo record 10519652): URLs and MD5s as listed in
# medmnist 3.x's INFO["pathmnist"]. Only the 28 px file is the same as MedMNIST v2's; the 64, 128
# and 224 px files exist only in MedMNIST+.
_ZENODO = "https://zenodo.org/records/10519652/files/"
PATHMNIST_FILES = {
    "pathmnist": (_ZENODO + "pathmnist.npz?download=1", "a8b06965200029087d5bd730944a56c1"),
    "pathmnist_64": (_ZENODO + "pathmnist_64.npz?download=1", "55aa9c1e0525abe5a6b9d8343a507616"),
    "pathmnist_128": (_ZENODO + "pathmnist_128.npz?download=1", "ac42d08fb904d92c244187169d1fd1d9"),
    "pathmnist_224": (_ZENODO + "pathmnist_224.npz?download=1", "2c51a510bcdc9cf8ddb2af93af1eadec"),
}
SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
FOLDER_SPLIT = {"test": 0.15, "val": 0.15}  # the rest is train
MAX_FOLDER_SIZE = 224


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, 3, S, S) uint8; may be a non-contiguous view of the file's NHWC array
    labels: torch.Tensor  # (N,) int64, in [0, len(classes))
    classes: list
    source: str
    fingerprint: str

    def __len__(self):
        return len(self.labels)


def name_key(name):
    """How class names are compared: case, spaces, hyphens and underscores do not count."""
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


_PATHMNIST_BY_KEY = {name_key(name): name for name in PATHMNIST_CLASSES}


def pathmnist_name(name):
    """Our spelling of a PathMNIST class ("Smooth Muscle", MedMNIST's "smooth muscle" ->
    "smooth_muscle"); any other name as it is."""
    return _PATHMNIST_BY_KEY.get(name_key(name), name)


def class_prompts(classes, template=None):
    """One prompt per class name: `{desc}` is the PathMNIST description (else the name with spaces)."""
    template = template or DEFAULT_PROMPT_TEMPLATE
    prompts = []
    for name in classes:
        desc = PATHMNIST_DESCRIPTIONS.get(pathmnist_name(name), name.replace("_", " "))
        try:
            prompts.append(template.format(desc=desc, name=name))
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"prompt template {template!r}: only {{desc}} and {{name}} can be used ({e})") from None
    return prompts


def resolve_classes(requested, classes):
    """Class names or indices (as strings or ints) -> indices into `classes`."""
    out = []
    for item in requested:
        item = str(item).strip()
        if item in classes:
            out.append(classes.index(item))
        elif item.isdigit() and int(item) < len(classes):
            out.append(int(item))
        else:
            raise UserError(f"unknown class '{item}'; known: {', '.join(classes)} (or 0-{len(classes) - 1})")
    return out


def resize_images(images, size):
    """Antialiased bilinear resize of float images (B, 3, H, W) -> (B, 3, size, size)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# The size path: how a data image of side S reaches a model that works at `size` px, and back.
# A small margin (28 -> 32 for PathMNIST on medsynth-mini) is reflect-padded and centre-cropped
# back, so the way in and out is exact: no resampling blurs the nuclei. A margin larger than
# PAD_LIMIT * S (224 -> 512 for the paper preset) is an antialiased resize both ways.
PAD_LIMIT = 0.25


def pads(side, size):
    """(before, after) reflect padding that takes `side` to `size`, or None when the size path
    resizes instead (a model smaller than the data, or a margin over PAD_LIMIT of the side)."""
    margin = size - side
    if margin < 0 or margin > PAD_LIMIT * side:
        return None
    return margin // 2, margin - margin // 2


def to_model_size(images, size):
    """float (B, 3, S, S) data images -> (B, 3, size, size) model images (the size path in)."""
    side = images.shape[-1]
    pad = pads(side, size)
    if pad is None:
        return resize_images(images, size)
    if pad == (0, 0):
        return images
    return F.pad(images, (pad[0], pad[1], pad[0], pad[1]), mode="reflect")


def from_model_size(images, side):
    """float (B, 3, size, size) model images -> (B, 3, side, side): the exact inverse of
    to_model_size on padded images (the centre crop), a resize otherwise."""
    size = images.shape[-1]
    pad = pads(side, size)
    if pad is None:
        return resize_images(images, side)
    return images[..., pad[0]:pad[0] + side, pad[0]:pad[0] + side]


def resize_uint8(images, size, chunk=512):
    """Resize a uint8 set in chunks so a 224 px dataset is never held as float all at once."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = resize_images(images[i:i + chunk].float(), size)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def file_md5(path, chunk=1 << 20):
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            md5.update(block)
    return md5.hexdigest()


def default_cache_dir():
    return os.environ.get("MEDSYNTH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medsynth")


def _download(url, md5, dest):
    """Stream `url` into a temp file beside `dest` with a progress bar; rename only if the MD5 matches."""
    name = os.path.basename(dest)
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache folder {os.path.dirname(dest)} ({e.strerror}); "
                        f"set MEDSYNTH_CACHE to a writable folder") from None
    tmp = dest + ".part"
    got = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}") as bar:
                while block := response.read(1 << 20):
                    f.write(block)
                    got.update(block)
                    bar.update(len(block))
    except BaseException as e:  # also Ctrl-C: never leave a partial file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, ValueError)):  # URLError, timeouts, refusals are OSErrors
            raise
        reason = getattr(e, "reason", None) or e
        raise UserError(f"cannot download {name} ({reason}); download {url.split('?')[0]} by hand "
                        f"and put it at {dest}") from None
    if got.hexdigest() != md5:
        os.remove(tmp)
        raise UserError(f"downloaded {name} has MD5 {got.hexdigest()}, expected {md5}: "
                        f"the download is corrupt or the file changed upstream; try again")
    os.replace(tmp, dest)


def _official_file(name, cache_dir):
    """Path of the verified official PathMNIST file in the cache (downloaded if missing) and its MD5."""
    url, md5 = PATHMNIST_FILES[name]
    dest = os.path.join(cache_dir or default_cache_dir(), name + ".npz")
    if not os.path.exists(dest):
        _download(url, md5, dest)
    elif (got := file_md5(dest)) != md5:
        raise UserError(f"{dest} has MD5 {got}, expected {md5} for the official {name}.npz: "
                        f"delete it to download it again")
    return dest, md5


def _load_npz(path, split, fingerprint):
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from None
    with data:
        for key in (f"{split}_images", f"{split}_labels"):
            if key not in data.files:
                raise UserError(f"{path}: missing key '{key}' (keys present: {', '.join(data.files)}; "
                                f"expected MedMNIST's {{train,val,test}}_{{images,labels}})")
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        classes = [pathmnist_name(str(name)) for name in data["classes"]] if "classes" in data.files \
            else list(PATHMNIST_CLASSES)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[1] != images.shape[2] \
            or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise UserError(f"{path}: {split}_images must be uint8 (N, S, S, 3) or (N, S, S), "
                        f"got {images.dtype} {tuple(images.shape)}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.size != len(images):
        raise UserError(f"{path}: {split}_labels must hold one integer label per image, "
                        f"got {labels.dtype} {tuple(labels.shape)} for {len(images)} images")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise UserError(f"{path}: {split}_labels out of range: found {labels.min()}..{labels.max()}, "
                        f"expected 0..{len(classes) - 1} for {len(classes)} classes "
                        f"(add a 'classes' array to the .npz to name other classes)")
    x = torch.from_numpy(images)
    x = x[..., None] if x.ndim == 3 else x
    x = x.permute(0, 3, 1, 2).expand(-1, 3, -1, -1)  # (N, S, S, C) -> (N, 3, S, S), no copy
    return ImageSet(x, torch.from_numpy(labels), classes, os.path.abspath(path), fingerprint)


def list_images(folder):
    """Names of the image files in `folder` (hidden ones left out), sorted."""
    return sorted(f for f in os.listdir(folder)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS)
                  and os.path.isfile(os.path.join(folder, f)))


def class_folders(folder):
    """{sub-folder: class name} of a class-per-folder directory, in folder-name order. A PathMNIST
    class in any spelling gets our name; two sub-folders naming one class are refused."""
    classes = {}
    for sub in sorted(d for d in os.listdir(folder)
                      if not d.startswith(".") and os.path.isdir(os.path.join(folder, d))):
        name = pathmnist_name(sub)
        other = next((seen for seen, known in classes.items() if known == name), None)
        if other is not None:
            raise UserError(f"{folder}: sub-folders '{other}' and '{sub}' both name {name}; keep one")
        classes[sub] = name
    return classes


def _split_by_hash(items):
    """{split: items} of one class: 15 % test, 15 % val (at least one each from 3 images), the
    rest train, ordered by a hash of the name: fixed, seed-independent, roughly random."""
    items = sorted(items, key=lambda item: hashlib.md5(item[0].encode()).hexdigest())
    n_test = round(FOLDER_SPLIT["test"] * len(items)) or int(len(items) >= 3)
    n_val = round(FOLDER_SPLIT["val"] * len(items)) or int(len(items) >= 3)
    return {"test": items[:n_test], "val": items[n_test:n_test + n_val], "train": items[n_test + n_val:]}


def _folder_files(root, split):
    """(classes, {split: [(relative path, label)]}) for the split layout or the hashed 70/15/15 one."""
    present = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    if present and split not in present:
        raise UserError(f"{root}: has {', '.join(present)} sub-folders but no '{split}' one")
    # {split or None: {sub-folder path relative to root: class name}}
    layout = {s: {os.path.join(s, sub): name for sub, name in class_folders(os.path.join(root, s)).items()}
              for s in present} if present else {None: class_folders(root)}
    classes = sorted({name for dirs in layout.values() for name in dirs.values()})
    if not classes:
        raise UserError(f"{root}: no class sub-folders (expected one folder of images per class)")
    if set(classes) == set(PATHMNIST_CLASSES):
        classes = list(PATHMNIST_CLASSES)  # PathMNIST's label order, so npz-trained classifiers agree
    files = {s: [] for s in SPLITS}
    for key, dirs in layout.items():
        for rel, name in dirs.items():
            names = list_images(os.path.join(root, rel))
            if not names:
                raise UserError(f"{os.path.join(root, rel)}: class folder holds no images ({', '.join(IMAGE_EXTS)})")
            items = [(os.path.join(rel, n), classes.index(name)) for n in names]
            for s, part in ({key: items} if key is not None else _split_by_hash(items)).items():
                files[s] += part
    return classes, files


def read_image(path, square=False):
    """An image file as uint8 RGB (3, H, W); square: its centre square (3, S, S), S = min(H, W)."""
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB")).copy()
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None
    x = torch.from_numpy(rgb).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    if square:
        height, width = x.shape[1:]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        x = x[:, top:top + side, left:left + side]
    return x


def read_images(root, files, size, square=False, desc="reading images"):
    """Image files under root as one uint8 tensor (N, 3, size, size), each resized on its own."""
    images = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    for i, rel in enumerate(tqdm(files, desc=desc, leave=False, disable=len(files) < 2000)):
        images[i] = resize_uint8(read_image(os.path.join(root, rel), square)[None], size)[0]
    return images


def image_batches(root, files, batch_size=64):
    """Image files under root, read batch_size at a time, as uint8 batches (B, 3, H, W): a batch of
    mixed sizes is handed out one image at a time (B = 1) rather than resized here."""
    for i in range(0, len(files), batch_size):
        images = [read_image(os.path.join(root, rel)) for rel in files[i:i + batch_size]]
        if all(x.shape == images[0].shape for x in images):
            yield torch.stack(images)
        else:
            yield from (x[None] for x in images)


def files_fingerprint(root, files):
    """md5 over the names and contents of files under root: it changes when any of them does."""
    md5 = hashlib.md5()
    for rel in sorted(files):
        md5.update(f"{rel}\0{file_md5(os.path.join(root, rel))}\0".encode())
    return md5.hexdigest()


def _load_folder(root, split, size):
    classes, files = _folder_files(root, split)
    every = sorted(rel for items in files.values() for rel, _ in items)
    items = sorted(files[split], key=lambda item: (item[1], item[0]))
    if not items:
        raise UserError(f"{root}: the {split} split is empty")
    if size is None:
        size = min(read_image(os.path.join(root, every[0]), square=True).shape[-1], MAX_FOLDER_SIZE)
    images = read_images(root, [rel for rel, _ in items], size, square=True, desc=f"reading {split} images")
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    # The whole folder (every split) is fingerprinted, as the md5 of an .npz covers all of its splits.
    return ImageSet(images, labels, classes, os.path.abspath(root), files_fingerprint(root, every))


def per_class_subset(data, seed, k=None, fraction=None):
    """Images drawn per class by `seed`, kept in their original order: exactly k of every class
    (few-shot), or round(fraction * n) of a class of n images, at least 1 (scarce real data)."""
    if fraction == 1:
        return data
    rng = torch.Generator().manual_seed(seed)
    keep = []
    for label, name in enumerate(data.classes):
        idx = torch.nonzero(data.labels == label).flatten()
        if k is not None and len(idx) < k:
            raise UserError(f"--few-shot {k}: class '{name}' has only {len(idx)} images in this split")
        if len(idx):
            n = k if k is not None else max(1, round(fraction * len(idx)))
            keep.append(idx[torch.randperm(len(idx), generator=rng)[:n]])
    keep = torch.cat(keep).sort().values
    return replace(data, images=data.images[keep], labels=data.labels[keep])


def load_split(spec, split="train", size=None, few_shot=None, seed=0, cache_dir=None):
    """Load one split of `spec` (official name, .npz path or folder) as an ImageSet; see module doc."""
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    if size is not None and size < 8:
        raise UserError(f"image size {size}: must be at least 8 px")
    if few_shot is not None and few_shot < 1:
        raise UserError(f"--few-shot {few_shot}: must be at least 1")
    spec = os.fspath(spec)
    if spec in PATHMNIST_FILES:
        path, md5 = _official_file(spec, cache_dir)
        data = _load_npz(path, split, md5)
        data.source = spec
    elif os.path.isdir(spec):
        data = _load_folder(spec, split, size)
    elif os.path.isfile(spec):
        data = _load_npz(spec, split, file_md5(spec))
    else:
        raise UserError(f"--data {spec}: not a file or folder, nor one of {', '.join(PATHMNIST_FILES)}")
    if few_shot is not None:
        data = per_class_subset(data, seed, k=few_shot)
    if size is not None:
        data.images = resize_uint8(data.images, size)
    return data
