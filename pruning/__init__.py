"""certiprune.pruning: make sparse networks and hand them to the verifier.

Layers, each importing only those below it (and ``verifier`` for bounds):
``data``, ``models`` → ``objectives`` (training regimes, ReLU-stability loss) → ``train`` (one
loop) → ``sparsity`` (``torch.nn.utils.prune`` masks) → ``methods/`` (one file per family of
importance scores) → ``schedule`` (one-shot, iterative with rewinding) → ``compact``,
``export`` (ONNX, VNN-LIB) → ``cli`` (``certiprune train | prune | export``; ``cli_config``
reads their flags from a TOML file).
"""
