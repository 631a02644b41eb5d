"""The `reference` backend: plain PyTorch implementations of both operators, the oracle every backend is tested
against. The sparse convolution's reference is also the dense masked path that the automatic choice uses above the
density crossover."""
