"""Datasets and SimCLR augmentations.

Small datasets (CIFAR-10/100) are decoded once and kept in memory as uint8 [N, H, W, 3]; their
augmentations run batched on the training device (`BatchAugment`), so no DataLoader worker and no
per-image Python call is needed. Large ones (ImageNet, any ImageFolder tree) stay on disk:
DataLoader workers kept for the whole run decode each image and make its uint8 view in PIL (of
SimCLR's recipe, the random resized crop and the flip only), and the training device does the rest
batched (`Views`): SimCLR's colour jitter, grayscale and Gaussian blur (`BatchAugment.colour`),
then normalisation. `simclr_transform` is the whole recipe in PIL, one image at a time: the
reference that the batched views follow in distribution.
"""
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter
from torchvision.ops import roi_align
from torchvision.transforms import v2 as T

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
SMALL = ("cifar10", "cifar100")
DATASETS = SMALL + ("imagenet", "folder")


class InMemoryImages(torch.utils.data.Dataset):
    """images uint8 [N, H, W, 3] and targets int64 [N], as CPU tensors.

    Indexing gives (normalised float image [3, H, W], target, index), the form the feature pass
    (monitor.extract_features) and the linear probe read.
    """

    def __init__(self, images, targets, classes, mean, std):
        self.images, self.targets, self.classes = images, targets, classes
        self.mean_std = (tuple(mean), tuple(std))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.normalised(torch.tensor([i]))[0], int(self.targets[i]), i

    def normalised(self, idx):
        """The evaluation view of images idx [B]: float [B, 3, H, W], normalised."""
        return normalise(self.images[idx].permute(0, 3, 1, 2), self.mean_std)


class DataError(ValueError):
    """A file of the dataset that cannot be read; the message names it."""

    def sentence(self):
        """The message. A DataLoader worker's error reaches the main process as the same type with
        the worker's traceback around the message, whose last line holds the original."""
        return str(self).rstrip().splitlines()[-1].split("DataError: ", 1)[-1]


class DataNotFound(ValueError):
    """--data does not hold the dataset (or the subset asked for); the message says what it
    should hold."""


def read_image(path):
    """The RGB PIL image at path (torchvision's default loader), or a DataError naming the file."""
    try:
        with open(path, "rb") as f, Image.open(f) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's truncated, corrupt or unknown files
        raise DataError(f"cannot read image {path}: {e} (a truncated or corrupt file? "
                        "replace or delete it)") from None


def _decode(path):
    return np.asarray(read_image(path))


def _folder_to_memory(folder, workers):
    tree = torchvision.datasets.ImageFolder(folder, loader=read_image)
    # PIL decodes without the GIL; the rank itself is idle meanwhile, so it decodes too.
    with ThreadPoolExecutor(max(1, workers + 1)) as pool:
        arrays = list(pool.map(_decode, [path for path, _ in tree.samples], chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: images of several sizes {sorted(shapes)[:3]}...; an in-memory "
                         "dataset needs one size (use --dataset folder for mixed sizes)")
    return torch.from_numpy(np.stack(arrays)), torch.as_tensor(tree.targets), tree.classes


def _split_dir(root, names):
    for name in names:
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def load_dataset(name, root, train, download=False, workers=4):
    """The train (or test) split of `name` from `root`.

    cifar10/cifar100: torchvision's pickled format in root (fetched with download=True, which
    creates root) or an ImageFolder tree root/train and root/test, detected; decoded into an
    InMemoryImages. imagenet: root/train and root/val. folder: root/train and root/val or root/test.
    The two last return a torchvision ImageFolder of PIL images: wrap it in Transformed for a view.
    Raises DataNotFound when root does not hold the data, DataError for a file that cannot be read.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown --dataset {name!r}; choose from {', '.join(DATASETS)}")
    eval_names = ("test",) if name in SMALL else ("val", "test") if name == "folder" else ("val",)
    layout = (f"ImageFolder trees train/<class>/*.jpg and {' or '.join(eval_names)}/<class>/*.jpg"
              + (" (or torchvision's cifar-10-batches-py/)" if name == "cifar10" else
                 " (or torchvision's cifar-100-python/)" if name == "cifar100" else ""))
    if download and name in SMALL:
        os.makedirs(root, exist_ok=True)
    if not root or not os.path.isdir(root):
        raise DataNotFound(f"--data {root!r} is not a directory; give the folder that holds "
                           f"{layout}")
    folder = _split_dir(root, ("train",) if train else eval_names)
    if name in SMALL:
        mean, std = MEAN_STD[name]
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        pickled = os.path.isdir(os.path.join(root, cls.base_folder))
        if pickled or (download and folder is None):
            try:
                ds = cls(root, train=train, download=download)
            except (OSError, RuntimeError) as e:     # urllib's URLError is an OSError
                if download:
                    raise DataNotFound(f"could not download {name} into {root} "
                                       f"({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}); without "
                                       f"network, put it there yourself as {layout}") from None
                raise DataNotFound(f"{os.path.join(root, cls.base_folder)} is incomplete "
                                   f"or corrupt ({str(e).splitlines()[0]})") from None
            return InMemoryImages(torch.from_numpy(ds.data), torch.as_tensor(ds.targets),
                                  ds.classes, mean, std)
        if folder is None:
            raise DataNotFound(f"--data {root!r} does not hold {name}: expected {layout}")
        images, targets, classes = _folder_to_memory(folder, workers)
        return InMemoryImages(images, targets, classes, mean, std)
    if folder is None:
        raise DataNotFound(f"--data {root!r} does not hold --dataset {name}: expected {layout}")
    return torchvision.datasets.ImageFolder(folder, loader=read_image)


def load_splits(name, root, test=True, subset_size=0, download=False, workers=4):
    """train.py's data: (train split, optionally cut to a fixed random subset of subset_size
    images, test split or None when test is false). Under torchrun rank 0 downloads first.
    Raises DataNotFound with a sentence that says what --data should hold."""
    import torch.distributed as dist
    ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    first = ranks == 1 or dist.get_rank() == 0
    if download and not first:
        dist.barrier()                                  # rank 0 downloads first
    try:
        train_set = load_dataset(name, root, train=True, download=download and first,
                                 workers=workers)
        test_set = load_dataset(name, root, train=False, workers=workers) if test else None
    except DataNotFound as e:
        hint = (f", or add --download to fetch {name} there"
                if name in SMALL and not download else "")
        raise DataNotFound(f"{e}{hint}") from None
    except (ValueError, RuntimeError, OSError) as e:
        raise DataNotFound(str(e)) from None
    finally:
        if download and first and ranks > 1:
            dist.barrier()
    try:
        return subset(train_set, subset_size, seed=1234), test_set
    except ValueError as e:
        raise DataNotFound(f"--train-subset: {e}") from None


class GaussianBlur:
    """SimCLR's Gaussian blur of a PIL image (Chen et al. 2020, appendix A): sigma uniform in
    [0.1, 2.0], then PIL's own filter, as moco-v3 does (`moco/loader.py`), several times faster
    than torchvision's blur of a PIL image, which converts it to a tensor and back.

    sigma is torch.empty(()).uniform_(*sigma) from torch's global generator, so that Transformed's
    keyed seeding fixes it. PIL runs three box blurs of variance sigma^2 in all (Gwosdek et al.
    2011, extended box filtering) with no kernel size; SimCLR's kernel, 10% of the image side, spans
    +-5.5 sigma at 224 px. From sigma 1 the result is within 1.5 grey levels on average of a
    sampled Gaussian, a few levels below that (test_spcl.py measures both).
    """

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        sigma = float(torch.empty(()).uniform_(*self.sigma))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def _to_tensor(mean_std):
    """The last steps of a PIL transform: uint8 [3, S, S], or normalised float with mean_std."""
    if mean_std is None:
        return [T.PILToTensor()]
    return [T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(*mean_std)]


def simclr_transform(size=224, strength=1.0, blur=True, mean_std=None):
    """SimCLR's augmentation of one PIL image (Chen et al. 2020, appendix A): a random resized crop
    with flip, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5, ImageNet only).
    Returns uint8 [3, size, size], or a normalised float view with mean_std.

    The reference recipe, all of it in PIL: Views no longer runs it. Its on-disk workers run the
    first two steps only (crop_flip_transform, the same draws from the same key), and the colour
    jitter, grayscale and blur run batched on the training device (BatchAugment.colour, the same
    distribution: test_spcl.py compares the two)."""
    s = strength
    steps = [T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip(),
             T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
             T.RandomGrayscale(p=0.2)]
    if blur:
        steps.append(T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5))
    return T.Compose(steps + _to_tensor(mean_std))


def eval_transform(size=224, mean_std=None):
    """Resize to size/0.875 and centre-crop: the standard evaluation view of ImageNet; uint8, or
    normalised float with mean_std."""
    return T.Compose([T.Resize(round(size / 0.875), antialias=True), T.CenterCrop(size)]
                     + _to_tensor(mean_std))


def normalise(x, mean_std):
    """uint8 images [B, 3, H, W] on any device -> float, (x / 255 - mean) / std."""
    return standardise(x.float().div_(255), mean_std)


def standardise(x, mean_std):
    """float images [B, 3, H, W] in [0, 1] -> (x - mean) / std, per channel, in place: every
    caller's x is a temporary of its own."""
    mean, std = _channel_constants(tuple(map(tuple, mean_std)), x.device)
    return x.sub_(mean).div_(std)


@functools.lru_cache(maxsize=None)
def _channel_constants(mean_std, device):
    """mean and std as [1, 3, 1, 1] tensors on device, made once per (mean_std, device)."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in mean_std)


def to_device(x, device):
    """CPU tensor x on device without waiting: a blocking host-to-GPU copy first waits for every
    kernel queued before it, so each random draw that a batched augmentation sends to the GPU would
    stall the step. Pinned (page-locked) memory lets the copy run in the queue's order, and
    PyTorch's pinned-memory cache keeps x's block until the copy has run."""
    device = torch.device(device)
    if device.type == "cuda" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def _gray(x):
    """ITU-R 601 luma with torchvision's coefficients: [B, 3, H, W] -> [B, 1, H, W]."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _shift_hue(x, shift):
    """Rotate the hue of RGB images x [b, 3, H, W] in [0, 1] by shift [b] turns.

    torchvision's formulas (adjust_hue) in float arithmetic only: masks of 0 and 1 from sign()
    where torch.where, max(1)'s indices and % were, which take several times longer on a CPU core.
    The same floats bit for bit (test_spcl.py keeps the form with them and compares): a mask
    multiplies a finite value by 1 or 0, and t - floor(t) rounds the same exact number as t % 1.
    """
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    coloured = torch.sign(delta)                                 # 1 where delta > 0, else 0
    # The sextant from the first channel that holds the maximum, as max(1)'s index.
    is_r = 1 - torch.sign(maxc - r)
    is_g = (1 - torch.sign(maxc - g)) * (1 - is_r)
    is_b = 1 - is_r - is_g
    safe = delta + (1 - coloured)                                # delta, or 1 where it is 0
    hue = is_r * ((g - b) / safe) + is_g * (2 + (b - r) / safe) + is_b * (4 + (r - g) / safe)
    hue = hue / 6 * coloured + shift.view(-1, 1, 1)
    hue = hue - hue.floor()                                      # mod 1
    sat = delta / (maxc + (1 - torch.sign(maxc)))                # 0 where maxc (so delta) is 0
    # HSV -> RGB through the closed form f(n) = v - v s max(0, min(k, 4 - k, 1)),
    # k = (n + 6h) mod 6.
    # n = 5, 3, 1 made on x's device: torch.tensor([5., 3., 1.], device=...) would copy from
    # pageable host memory, which first waits for the GPU's queue (one stall per batch).
    n = torch.arange(5, 0, -2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = n + 6 * hue[:, None]                                     # b x 3 x H x W
    k.sub_(k.div(6).floor_().mul_(6))                            # mod 6
    k = torch.minimum(k, torch.neg(k).add_(4), out=k).clamp_(0, 1)
    # In place: two image-sized temporaries where a new one for each operation took longer.
    return k.mul_((maxc * sat)[:, None]).neg_().add_(maxc[:, None])


def crop_resize(x, boxes, size):
    """Crop box b of image b and resize it to size x size, for a whole batch in one call.

    x [B, C, H, W] float; boxes [B, 4] (x1, y1, x2, y2) in pixels, x2 and y2 exclusive. roi_align
    with aligned=True samples at the same points as torchvision's bilinear resize of the crop
    (pixel centres, align_corners=False); sampling_ratio=0 averages ceil(crop/size) samples per
    output pixel when shrinking, which stands in for the antialiasing of torchvision's resize.
    """
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype)[:, None], boxes], 1)  # B x 5
    rois = to_device(rois.to(x.dtype), x.device)
    return roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)


def adjust(x, op, factor):
    """One colour-jitter operation with a factor per image, as torchvision's adjust_* functions:
    x [b, 3, H, W] in [0, 1], op 0 brightness, 1 contrast, 2 saturation, 3 hue; factor [b].
    Brightness, contrast and saturation overwrite x (f x + (1 - f) grey, the floats of the
    expression, without a batch-sized temporary for each product and sum); returns the result."""
    f = factor.view(-1, 1, 1, 1)
    if op == 0:
        x = x.mul_(f)
    elif op in (1, 2):
        grey = _gray(x).mean((2, 3), keepdim=True) if op == 1 else _gray(x)
        x = x.mul_(f).add_((1 - f) * grey)            # grey is computed before x changes
    else:
        x = _shift_hue(x, factor)
    return x.clamp_(0, 1)


class BatchAugment:
    """SimCLR's augmentation applied to a whole batch at once, on any device, in two parts that
    can run apart: `crop` (RandomResizedCrop: scale 0.08-1, ratio 3/4-4/3, torchvision's
    10-attempt rule, through roi_align; flip p 0.5) and `colour` (colour jitter with p 0.8 in a
    random order per image, grayscale p 0.2, with blur Gaussian blur p 0.5). Same distribution as
    simclr_transform(size, strength, blur).

    __call__(images uint8 [B, H, W, 3], generator) -> float [B, 3, size, size], both parts and
    normalisation: the in-memory views (CIFAR, no blur: SimCLR's CIFAR recipe). On disk the
    DataLoader workers crop and flip in PIL and Views runs `colour` on the device. The random
    draws come from the CPU `generator`, so a run is reproducible on any device.
    """

    def __init__(self, size, mean_std, strength=0.5, blur=False):
        self.size, self.mean_std = size, mean_std
        self.jitter = (0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
        # SimCLR's blur kernel: 10% of the image side, odd (23 taps at 224 px, 3 at 32, 1 below
        # 20, which leaves the image as it is).
        self.blur_kernel = 2 * (size // 20) + 1 if blur else None

    def crop_boxes(self, B, H, W, generator, attempts=10):
        """torchvision's RandomResizedCrop.get_params for B images at once -> [B, 4]
        (x1, y1, x2, y2)."""
        area = H * W * torch.empty(B, attempts).uniform_(0.08, 1.0, generator=generator)
        log_ratio = torch.empty(B, attempts).uniform_(math.log(3 / 4), math.log(4 / 3),
                                                      generator=generator)
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(area * ratio).round()
        h = torch.sqrt(area / ratio).round()
        ok = (w > 0) & (h > 0) & (w <= W) & (h <= H)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((B,), -1))
        u = torch.rand(B, 2, generator=generator)
        pick = first.clamp(min=0)[:, None]
        w, h = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
        # No attempt fits (rare): the whole image, as torchvision's fallback for square inputs.
        w = torch.where(first >= 0, w, torch.full_like(w, W))
        h = torch.where(first >= 0, h, torch.full_like(h, H))
        x1 = torch.floor(u[:, 0] * (W - w + 1))
        y1 = torch.floor(u[:, 1] * (H - h + 1))
        return torch.stack([x1, y1, x1 + w, y1 + h], 1)

    def __call__(self, images, generator):
        return standardise(self.colour(self.crop(images, generator), generator), self.mean_std)

    def crop(self, images, generator):
        """The random resized crop and the flip of uint8 images [B, H, W, 3] -> float
        [B, 3, size, size] in [0, 1]."""
        B, H, W, _ = images.shape
        x = crop_resize(images.permute(0, 3, 1, 2).float().div_(255),         # B x 3 x H x W
                        self.crop_boxes(B, H, W, generator), self.size)        # B x 3 x S x S
        flip = to_device(torch.rand(B, generator=generator) < 0.5, x.device).view(-1, 1, 1, 1)
        return torch.where(flip, x.flip(3), x)

    def colour(self, x, generator):
        """Colour jitter, grayscale and (with blur) Gaussian blur of float views x [B, 3, S, S] in
        [0, 1], of any size S, in place: x. Each step copies the images drawn for it out and back
        (index_select, index_copy_: whole images, at memory speed) rather than masking all of
        them with torch.where. The blur's draws come last, so without blur the draws and the
        views are the in-memory views' of before the blur existed."""
        B = x.shape[0]
        x = self._color_jitter(x, generator)
        idx = torch.nonzero(torch.rand(B, generator=generator) < 0.2)[:, 0]
        if len(idx):
            idx = to_device(idx, x.device)
            x.index_copy_(0, idx, _gray(x.index_select(0, idx)).expand(-1, 3, -1, -1))
        if self.blur_kernel is not None:
            blur = torch.rand(B, generator=generator) < 0.5
            sigma = torch.empty(B).uniform_(0.1, 2.0, generator=generator)
            idx = torch.nonzero(blur)[:, 0]
            if len(idx):
                sigma = to_device(sigma[idx], x.device)
                idx = to_device(idx, x.device)
                x.index_copy_(0, idx, gaussian_blur(x.index_select(0, idx), sigma,
                                                    self.blur_kernel))
        return x

    def _color_jitter(self, x, generator):
        B = x.shape[0]
        bri, con, sat, hue = self.jitter
        apply = torch.rand(B, generator=generator) < 0.8
        factors = torch.stack([torch.empty(B).uniform_(1 - bri, 1 + bri, generator=generator),
                               torch.empty(B).uniform_(1 - con, 1 + con, generator=generator),
                               torch.empty(B).uniform_(1 - sat, 1 + sat, generator=generator),
                               torch.empty(B).uniform_(-hue, hue, generator=generator)], 1)  # B x 4
        order = torch.rand(B, 4, generator=generator).argsort(1)  # a random order per image
        for step in range(4):
            for op in range(4):
                idx = torch.nonzero(apply & (order[:, step] == op))[:, 0]
                if len(idx) == 0:
                    continue
                f = to_device(factors[idx, op], x.device)
                idx = to_device(idx, x.device)
                x.index_copy_(0, idx, adjust(x.index_select(0, idx), op, f))
        return x


def gaussian_blur(x, sigma, kernel_size):
    """Gaussian blur of float images x [B, C, H, W], one sigma per image (sigma [B] on x's
    device), as torchvision's gaussian_blur: the kernel sampled at the kernel_size (odd) integer
    offsets around the centre and normalised, edges reflected. Separable, two passes of
    kernel_size taps rather than one of kernel_size^2, through grouped convolutions (one group per
    channel of each image), so a batch of sigmas costs one call. On a GPU cuDNN may run them in
    TF32 (torch.backends.cudnn.allow_tf32), a relative error near 1e-3: below a grey level."""
    B, C, H, W = x.shape
    r = kernel_size // 2
    if kernel_size % 2 == 0 or r >= min(H, W):
        raise ValueError(f"kernel_size must be odd and below twice the image side, got "
                         f"{kernel_size} for {H} x {W}")
    offsets = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.to(x.dtype).view(-1, 1)) ** 2)      # B x K
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)        # BC x K
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")  # 1 x BC x H+2r x W+2r
    y = F.conv2d(y, kernel.view(B * C, 1, 1, kernel_size), groups=B * C)  # 1 x BC x H+2r x W
    y = F.conv2d(y, kernel.view(B * C, 1, kernel_size, 1), groups=B * C)  # 1 x BC x H x W
    return y.view(B, C, H, W)


# Named random streams for seeded_generator: one per use, so that no two uses share draws.
TRAIN_VIEWS, CLUSTER_VIEWS, PROTO_HEADS, PROBE_VIEWS = range(4)


def seeded_generator(*keys):
    """A CPU torch.Generator for the random stream named by integers, e.g. (seed, TRAIN_VIEWS,
    epoch, rank). Distinct tuples give unrelated streams (numpy's SeedSequence hashes them),
    where a formula such as seed * A + epoch * B + rank repeats one as soon as rank >= B; but
    SeedSequence ignores trailing zero words, so (5,) and (5, 0) name one stream: keys of one use
    have one length, and keys of different uses differ in their stream name (TRAIN_VIEWS, ...)."""
    entropy = [int(k) % 2**64 for k in keys]          # SeedSequence takes non-negative words
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def subset(dataset, n, seed):
    """A fixed random subset of n images (all when n = 0), in index order: the same images for the
    same seed (train.py's --train-subset and linear_eval.py's --subset both use seed 1234)."""
    if not n:
        return dataset
    total = len(dataset)
    if not 0 < n <= total:
        raise ValueError(f"subset of {n} images asked for, the split has {total}")
    keep = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if isinstance(dataset, InMemoryImages):
        return InMemoryImages(dataset.images[keep], dataset.targets[keep], dataset.classes,
                              *dataset.mean_std)
    dataset.samples = [dataset.samples[i] for i in keep]
    dataset.imgs = dataset.samples
    dataset.targets = [s[1] for s in dataset.samples]
    return dataset


# ---------------------------------------------------------------------------------------------
# Batches of views: one way for in-memory and on-disk datasets
# ---------------------------------------------------------------------------------------------

def crop_flip(images, mean_std, generator):
    """The linear probe's augmentation, batched on the images' device: RandomResizedCrop (scale
    0.08-1, resized back to H x W) and a horizontal flip (p 0.5) of uint8 images [B, H, W, 3] ->
    normalised float [B, 3, H, W]. The random draws come from the CPU `generator`."""
    B, H, W, _ = images.shape
    augment = BatchAugment(H, mean_std)            # for torchvision's crop rule, crop_boxes
    x = crop_resize(images.permute(0, 3, 1, 2).float().div_(255),
                    augment.crop_boxes(B, H, W, generator), (H, W))              # B x 3 x H x W
    flip = to_device(torch.rand(B, generator=generator) < 0.5, x.device).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    return standardise(x, mean_std)


def crop_flip_transform(size, mean_std=None):
    """crop_flip for one PIL image: uint8 [3, size, size], or normalised float with mean_std."""
    return T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
                     + _to_tensor(mean_std))


VIEWS = ("eval", "simclr", "crop_flip")


class Transformed(torch.utils.data.Dataset):
    """Items (view, target, index) of an on-disk dataset of (PIL image, target) pairs.

    transforms: a transform of one PIL image, or a dict of named ones. An item is asked for as an
    index (a single transform, torch's global generator), or as (index, key, name, copies):
    `copies` independent draws of transforms[name] (a tuple when copies > 1) whose randomness
    comes from seeded_generator(*key, index), so that a view depends on the run's seed, the epoch
    and the image only: not on the DataLoader worker that makes it, the number of workers, or where
    a resumed run restarted. The dataset itself is never modified (its own transform stays None),
    so one ImageFolder serves every view.
    """

    def __init__(self, dataset, transforms):
        self.dataset = dataset
        self.transforms = transforms if isinstance(transforms, dict) else {None: transforms}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i, key, name, copies = item if isinstance(item, tuple) else (item, None, None, 1)
        image, target = self.dataset[i]
        transform = self.transforms[name]
        with torch.random.fork_rng(devices=[], enabled=key is not None):
            # torchvision's transforms draw from torch's global CPU generator. Seeded alone: in a
            # worker torch.manual_seed would also queue the seed of each accelerator API (CUDA,
            # XPU, MTIA) that is not initialised there, formatting a stack trace each time, ~0.7
            # ms an image.
            if key is not None:
                torch.default_generator.manual_seed(int(seeded_generator(*key, i).initial_seed()))
            views = tuple(transform(image) for _ in range(copies))
        return (views if copies > 1 else views[0]), target, i


class _Keyed:
    """The batch sampler of Views' DataLoader: index batches -> batches of (index, key, view,
    copies) items for Transformed. Views points it at the next pass's batches before each pass, so
    that one DataLoader and its workers serve a whole run while the sampling stays in the main
    process: each item carries what makes its view."""

    def __init__(self):
        self.batch_indices, self.item = (), (None, None, 1)

    def __iter__(self):
        key, view, copies = self.item           # fixed for this pass, whatever Views sets next
        return ([(int(i), key, view, copies) for i in batch] for batch in self.batch_indices)


class _Sized:
    """An iterable with the len() of the batches it was made from, when they have one."""

    def __init__(self, iterable, length):
        self.iterable, self.length = iterable, length

    def __iter__(self):
        return iter(self.iterable)

    def __len__(self):
        if self.length is None:
            raise TypeError("these batches were made from index batches without a len()")
        return self.length()


class Views:
    """Batches of views of a dataset's images for train.py and linear_eval.py, the same call for an
    InMemoryImages (views made batched on `device`: BatchAugment, crop_flip) and an on-disk
    dataset (decoded and cropped by torchvision's PIL transforms in DataLoader workers, the simclr
    view's colour made batched on `device`).

        views = Views(dataset, image_size, mean_std, jitter=0.5, workers=4, device=device)
        for x, targets, indices in views.batches(batch_indices, "eval"): ...
        for (x1, x2), targets, indices in views.batches(batch_indices, "simclr", key, copies=2): ...

    view: "eval" (centre crop, or the image as it is in memory), "simclr" (SimCLR's augmentation,
    Gaussian blur on disk only) or "crop_flip" (the linear probe's). batch_indices: an iterable of
    index batches (e.g. a batch sampler). key: integers naming the random stream, e.g. (seed,
    TRAIN_VIEWS, epoch, rank), or a CPU torch.Generator to draw from (a generator's next draw
    stands for the key on disk). x is on `device`.

    On disk, the workers return uint8 views (a quarter of float32's bytes to collate, pin and
    copy): the eval and crop_flip views whole, the simclr view's random resized crop and flip only,
    a function of (key, image) whatever worker makes it. After a non-blocking copy to `device` the
    simclr views get their colour jitter (p 0.8, strength `jitter`), grayscale (p 0.2) and
    Gaussian blur (p 0.5) there, batched (BatchAugment.colour) with the draws of batch b from
    seeded_generator(*key, -1, b), so an image twice in a batch gets two colourings; then every
    view is normalised there. One DataLoader serves every pass of a Views, its workers started
    once (persistent_workers): a run does not pay their start and the dataset's copy into them
    every epoch. A pass begun while another is still being read (two loops interleaved, or one
    left unfinished and not yet closed) gets a DataLoader of its own.
    """

    def __init__(self, dataset, image_size, mean_std, jitter=0.5, workers=0, device="cpu"):
        self.dataset, self.image_size, self.mean_std = dataset, image_size, mean_std
        self.jitter, self.workers, self.device = jitter, workers, torch.device(device)
        self.in_memory = isinstance(dataset, InMemoryImages)
        # SimCLR's CIFAR recipe has no blur; on disk (ImageNet) blur is on.
        self.augment = BatchAugment(image_size, mean_std, jitter, blur=not self.in_memory)
        self._loader, self._busy = None, False      # on disk: the run's DataLoader, in a pass

    def batches(self, batch_indices, view, key=None, copies=1, start=0):
        """start: the position in its epoch of the first of batch_indices. A run resumed at batch
        s drops the first s index batches and passes start=s: its views are then those of the
        uninterrupted run (a key tuple draws batch b in memory from seeded_generator(*key, b), on
        disk its colour from seeded_generator(*key, -1, b); every image's crop from its own
        stream)."""
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        if view != "eval" and key is None:
            raise ValueError(f"the {view!r} view is random: give the key of its random stream")
        make = self._in_memory if self.in_memory else self._on_disk
        return _Sized(make(batch_indices, view, key, copies, start),
                      getattr(batch_indices, "__len__", None))

    def _in_memory(self, batch_indices, view, key, copies, start):
        for b, idx in enumerate(batch_indices, start):
            # A generator key is drawn from in turn; a key tuple names one stream per batch.
            g = (key if key is None or isinstance(key, torch.Generator)
                 else seeded_generator(*key, b))
            idx = torch.as_tensor(idx, dtype=torch.int64)
            # uint8 to the device, made into views there, as the on-disk views (a quarter of the
            # bytes of a float copy).
            images = to_device(self.dataset.images[idx], self.device)           # B x H x W x 3
            if view == "eval":
                x = [normalise(images.permute(0, 3, 1, 2), self.mean_std) for _ in range(copies)]
            else:
                make = (self.augment if view == "simclr"
                        else (lambda im, gen: crop_flip(im, self.mean_std, gen)))
                x = [make(images, g) for _ in range(copies)]                # B x 3 x S x S
            yield (tuple(x) if copies > 1 else x[0]), self.dataset.targets[idx], idx

    def _new_loader(self, persistent):
        size = self.image_size
        # uint8 views. The simclr view's crop and flip are simclr_transform's first steps, the
        # same as crop_flip's (and the same draws); its colour, grayscale and blur follow batched
        # on the device (_on_disk).
        transforms = {"eval": eval_transform(size), "simclr": crop_flip_transform(size),
                      "crop_flip": crop_flip_transform(size)}
        return torch.utils.data.DataLoader(
            Transformed(self.dataset, transforms), batch_sampler=_Keyed(),
            num_workers=self.workers, persistent_workers=persistent and self.workers > 0,
            pin_memory=self.device.type == "cuda")

    def _on_disk(self, batch_indices, view, key, copies, start):
        if isinstance(key, torch.Generator):
            key = (int(torch.randint(2**62, (1,), generator=key)),)
        shared = not self._busy
        if shared and self._loader is None:
            self._loader = self._new_loader(persistent=True)
        loader = self._loader if shared else self._new_loader(persistent=False)
        loader.batch_sampler.batch_indices = batch_indices
        loader.batch_sampler.item = (key, view, copies)
        self._busy = True
        try:
            for b, (x, targets, indices) in enumerate(loader, start):  # x: uint8 B x 3 x S x S
                x = [v.to(self.device, non_blocking=True) for v in (x if copies > 1 else [x])]
                if view == "simclr":
                    # -1, which no image index is: batch b's stream is none of the images' own.
                    g = seeded_generator(*key, -1, b)
                    x = [standardise(self.augment.colour(v.float().div_(255), g), self.mean_std)
                         for v in x]
                else:
                    x = [normalise(v, self.mean_std) for v in x]
                yield (tuple(x) if copies > 1 else x[0]), targets, indices
        finally:
            self._busy = self._busy and not shared


def shard(n, rank, world, batch_size):
    """This rank's share of indices 0..n-1 in order, as index batches: DistributedSampler's split
    without shuffling, padded with repeats to equal shares (a repeat lands on its own row again)."""
    indices = list(torch.utils.data.DistributedSampler(range(n), world, rank, shuffle=False))
    return torch.as_tensor(indices, dtype=torch.int64).split(batch_size)


def synthetic_jpegs(root, n, seed=0, sources=None):
    """An ImageFolder tree root/c0/*.jpg of n JPEGs (quality 90) with sides drawn from 256-400 px,
    for benchmarks of the on-disk path: the images of the ImageFolder tree `sources` (e.g.
    CIFAR-10's test split) enlarged, or enlarged noise, with grain (std 16 levels) for some 3.6
    bits per pixel (ImageNet's average file, ~110 kB at ~470 x 390 px, has ~4.8), so that
    decoding costs what it costs on photographs. Returns (the tree, whether sources were used)."""
    rng = np.random.default_rng(seed)
    paths = None
    if sources and os.path.isdir(sources):
        samples = torchvision.datasets.ImageFolder(sources).samples
        paths = [samples[i][0] for i in rng.choice(len(samples), n, replace=False)]
    os.makedirs(os.path.join(root, "c0"))
    for i in range(n):
        small = (read_image(paths[i]) if paths else
                 Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        w, h = (int(v) for v in rng.integers(256, 401, 2))
        pixels = np.asarray(small.resize((w, h), Image.BICUBIC)) + rng.normal(0, 16, (h, w, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            os.path.join(root, "c0", f"{i}.jpg"), quality=90)
    return torchvision.datasets.ImageFolder(root, loader=read_image), paths is not None
