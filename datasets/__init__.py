"""Data for sparsefold: seeded noise, image folders, WebDataset shards and the patch stream.

* :mod:`.noise`    -- ``add_noise`` (gaussian / poisson / binomial) and the evaluation convention.
* :mod:`.images`   -- list/load/save images, the offline ``builtin:skimage`` photo set.
* :mod:`.shards`   -- write image folders into shards, expand shard URL specs, fsspec schemes.
* :mod:`.patches`  -- seeded crops and dihedral transforms.
* :mod:`.stream`   -- ``PatchStream`` (rank/worker split, skip counting), loaders, epochs.
* :mod:`.prepare`  -- ``DataConfig`` -> training shard URLs and validation image files.

webdataset, PIL, scikit-image and fsspec are imported lazily inside the functions that need them.
"""

from sparsefold.datasets.images import (
    BUILTIN_PHOTOS,
    BUILTIN_VAL,
    builtin_skimage_dir,
    default_cache_dir,
    list_images,
    load_image,
    resolve_image_dir,
    save_image,
    split_builtin,
)
from sparsefold.datasets.noise import add_noise, gaussian_eval_noise, sample_sigma
from sparsefold.datasets.patches import dihedral, random_crops, stable_seed
from sparsefold.datasets.prepare import skipped_while_sharding, train_urls, val_files
from sparsefold.datasets.shards import (
    FSSPEC_SCHEMES,
    ensure_url_schemes,
    expand_urls,
    read_index,
    register_fsspec_schemes,
    write_shards,
)
from sparsefold.datasets.stream import PatchStream, check_shard_count, iterate_forever, make_loader

__all__ = [
    "BUILTIN_PHOTOS",
    "BUILTIN_VAL",
    "FSSPEC_SCHEMES",
    "PatchStream",
    "add_noise",
    "builtin_skimage_dir",
    "check_shard_count",
    "default_cache_dir",
    "dihedral",
    "ensure_url_schemes",
    "expand_urls",
    "gaussian_eval_noise",
    "iterate_forever",
    "list_images",
    "load_image",
    "make_loader",
    "random_crops",
    "read_index",
    "register_fsspec_schemes",
    "resolve_image_dir",
    "sample_sigma",
    "save_image",
    "split_builtin",
    "stable_seed",
    "skipped_while_sharding",
    "train_urls",
    "val_files",
    "write_shards",
]
