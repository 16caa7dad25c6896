"""synthlesion: synthetic lesions for medical imaging.

Three parts that work together:

* ``synthlesion.data``: image I/O that refuses bad data, case sources, integrity checks,
  patient-level splits and the embedded procedural phantom.
* ``synthlesion.augment``: batched classical augmentations on the GPU.
* ``synthlesion.models`` / ``synthlesion.pipelines``: mask-conditioned lesion diffusion.
* ``synthlesion.dataset``: the dataset builder whose guards keep synthetic data out of
  evaluation.
"""

from __future__ import annotations

__version__ = "0.1.0"
