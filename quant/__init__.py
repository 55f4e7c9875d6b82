"""edge_vila.quant — AWQ W4 search, RTN, INT8 ViT calibration, packing, quality reports.

Toolchain side: may import torch and the runtime; the runtime never imports this.
"""
