"""tpicore: tensor-parallel Llama inference in NumPy."""
