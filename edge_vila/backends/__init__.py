"""Runtimes behind one small interface (see `edge_vila.generate.Backend`)."""
