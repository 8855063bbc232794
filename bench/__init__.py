"""The benchmark of issue 10: the PyTorch tutorial's CIFAR-10 code against the pipeline's presets.

    python -m bench --images ../shared/datasets/cifar10-jpeg.tar.gz

One run on one machine: the tutorial baseline first (its training time is T), then each preset
through the pipeline's own stages; one row per run in reports/bench/results.csv, resumable.
"""
