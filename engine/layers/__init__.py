"""Model layers. Each op lives in one module so batch-invariant variants can be swapped in."""
