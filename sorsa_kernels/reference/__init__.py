"""Pure-PyTorch implementations: the ``torch`` backend (the CPU path) and, run on float64
copies of the inputs, the oracle every other backend is tested against. Each module documents
its op's backend interface."""
