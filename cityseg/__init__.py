"""cityseg-fast: high-throughput U-Net training for Cityscapes-style street scenes."""

import os

# OpenMP threads that spin while waiting lose their core to DataLoader workers on small machines:
# measured on 2 cores with one busy, a U-Net step took 2.0-2.5 s with spinning, 0.08-0.14 s with
# passive waiting. Must be set before torch loads its OpenMP runtime; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
