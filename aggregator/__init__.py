"""Flower ServerApp: discovers roles and drives fedhe jobs over the Grid, on ciphertexts only."""
