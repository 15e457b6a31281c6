"""The pipeline side of a worker: the warm engine, device placement, speed settings, the batcher
and the recipe written into each PNG. The only layer of the fleet that imports torch."""
